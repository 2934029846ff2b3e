"""Validate stage speed, side by side in one run.

1. Metadata extraction, images/s per core (single process, CPU time), on the download
   benchmark's corpus (real-size JPEG/PNG):
   - naive: a full decode with PIL `Image.open(path).convert("RGB")` per image;
   - Easel, header only: size, mode, DPI, ICC, EXIF from the header (no pixel decode);
   - Easel, complete: header + one verified decode (JPEG draft 1/8) + perceptual hash, i.e.
     `components.validate.inspect.inspect_image`, what the stage runs per distinct image.
2. The GX suite on 100,000 rows (synthetic metadata), with and without building Data Docs.

    .venv/bin/python -m benchmarks.validate_bench [--images 1000] [--rows 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks.download.corpus import build_corpus
from components.config import ValidateParams
from components.images import dpi_from_info, open_guarded
from components.validate.inspect import exif_orientation, inspect_image
from components.validate.rules import run_suite

REPO = Path(__file__).resolve().parents[1]


def naive(path: Path) -> tuple:
    image = Image.open(path).convert("RGB")
    return image.size, image.info.get("dpi")


def header_only(path: Path) -> tuple:
    with open_guarded(path) as image:
        return image.size, image.mode, dpi_from_info(image.info), exif_orientation(image)


def per_core_rate(func, paths: list[Path], repeats: int = 2) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        for path in paths:
            func(path)
        best = max(best, len(paths) / (time.process_time() - start))
    return best


def synthetic_table(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    width = rng.integers(300, 1400, rows)
    height = rng.integers(300, 1400, rows)
    dpi = rng.choice([72.0, 96.0, 150.0, 300.0, np.nan], rows)
    return pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(rows)],
            "format": rng.choice(["JPEG", "PNG", "WEBP", "GIF"], rows, p=[0.7, 0.2, 0.08, 0.02]),
            "mode": rng.choice(["RGB", "L", "CMYK", "1"], rows, p=[0.9, 0.05, 0.04, 0.01]),
            "animated": rng.random(rows) < 0.01,
            "header_read": True,
            "decodable": rng.random(rows) > 0.01,
            "short_side": np.minimum(width, height),
            "long_side": np.maximum(width, height),
            "aspect_ratio": width / height,
            "dpi": dpi,
            "dpi_effective": dpi,
            "kb_per_pixel": rng.random(rows) * 0.002,
            "caption": pd.array(np.where(rng.random(rows) < 0.02, None, "a caption"), dtype="string"),
            "caption_expected": True,
            "duplicate_of": pd.array([None] * rows, dtype="string"),
            "is_first_copy": True,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

    paths = build_corpus(REPO / ".easel" / "bench" / "corpus", max(args.images, 2000))[: args.images]
    jpeg = sum(p.suffix == ".jpg" for p in paths)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"corpus: {len(paths)} images ({jpeg} JPEG, {len(paths) - jpeg} PNG), "
        f"mean {sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KB"
    )
    naive_rate = per_core_rate(naive, paths)
    header_rate = per_core_rate(header_only, paths)
    full_rate = per_core_rate(lambda p: inspect_image(str(p)), paths)
    print(f"naive open().convert('RGB')      {naive_rate:8.1f} img/s per core   1.00x")
    print(f"Easel header only                {header_rate:8.1f} img/s per core  {header_rate / naive_rate:5.2f}x")
    print(f"Easel complete (decode + pHash)  {full_rate:8.1f} img/s per core  {full_rate / naive_rate:5.2f}x")
    for kind in (".jpg", ".png"):
        group = [p for p in paths if p.suffix == kind]
        n, f = per_core_rate(naive, group, 1), per_core_rate(lambda p: inspect_image(str(p)), group, 1)
        print(f"  {kind}: naive {n:7.1f}  complete {f:7.1f} img/s per core  {f / n:5.2f}x")

    table = synthetic_table(args.rows)
    params = ValidateParams()
    run_suite(table.head(100), params)  # warm-up: imports GX (about 5 s) outside the timing
    start = time.perf_counter()
    reasons, _ = run_suite(table, params)
    plain = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as docs:
        start = time.perf_counter()
        run_suite(table, params, Path(docs))
        with_docs = time.perf_counter() - start
    failed = sum(1 for r in reasons if r)
    print(f"GX suite on {args.rows:,} rows: {plain:.2f} s ({failed:,} rows failing); with Data Docs {with_docs:.2f} s")


if __name__ == "__main__":
    main()
