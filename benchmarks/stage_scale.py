"""How a stage's cost grows with the work: peak memory and images per second at 20k, 100k and 500k URLs.

A loopback image server (benchmarks/download/server.py, its own process, no added latency) serves
small distinct images (a 64 x 64 JPEG corpus; every URL's bytes differ by a trailer, so every
URL is a new image to store). For each size a fresh folder gets a URL list and a params file, and
`easel download` (and, with `--stages download validate`, `easel validate` after it) runs there as a
user runs it, in its own process (`--stages download validate caption` adds `easel caption` after
validate, with the tiny offline BLIP and tagger the demo uses). The parent samples the resident
memory of that process and all its children (the download workers) every 0.1 s from /proc, and
reports the peak of their sum, the peak of the stage's main process alone, the wall time and the
URLs per second.

    .venv/bin/python -m benchmarks.stage_scale --sizes 20000 100000 500000
    .venv/bin/python -m benchmarks.stage_scale --sizes 20000 100000 --stages download validate
    .venv/bin/python -m benchmarks.stage_scale --sizes 20000 100000 500000 --stages download validate caption \
        --caption-batch-size 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from benchmarks.download.run import start_image_server
from components.models.loaders import TINY_ROOT
from components.models.tiny import build_tiny_models

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".easel" / "bench"
MB = 2**20


def small_corpus(folder: Path, count: int = 256, side: int = 64) -> None:
    """`count` distinct small JPEGs (noise over a colour, about 2-3 KB each); idempotent."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        if path.exists():
            continue
        image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(side * side)])
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=60)
        path.write_bytes(buffer.getvalue())


def tree_rss(pid: int) -> tuple[int, int]:
    """(resident bytes of `pid` and all its descendants, of `pid` alone), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry.name)] = int(line.split()[1]) * 1024
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack += children.get(current, [])
    return total, rss.get(pid, 0)


def run_sampled(command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command`, sampling its process tree's memory; wall time and peaks."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"tree": 0, "main": 0}
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    while process.poll() is None:
        tree, main = tree_rss(process.pid)
        peaks["tree"], peaks["main"] = max(peaks["tree"], tree), max(peaks["main"], main)
        time.sleep(0.1)
    reader.join()
    return {
        "exit": process.returncode,
        "seconds": time.perf_counter() - started,
        "peak_tree_mb": peaks["tree"] / MB,
        "peak_main_mb": peaks["main"] / MB,
        "log_tail": b"".join(output).decode(errors="replace")[-1500:],
    }


def download_project(work: Path, n: int, port: int, caption_batch_size: int | None = None) -> Path:
    """A folder with `n` URLs in a CSV and params that download them from the loopback server."""
    work.mkdir(parents=True)
    with open(work / "urls.csv", "w") as fh:
        fh.write("url,title\n")
        for k in range(n):
            fh.write(f"http://127.0.0.1:{port}/img/{k}.jpg,poster {k}\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"].update(
        sources=[{"name": "bench", "path": "urls.csv", "url_column": "url"}],
        out_dir="data/download",
        per_host_concurrency=params["download"]["concurrency"],  # one host serves everything here
    )
    params["reporting"] = {"metrics_dir": "metrics", "plots_dir": "plots", "logs_dir": "logs"}
    # validate: rules that 64 px JPEGs without a DPI pass, so every image goes through every check;
    # near-duplicates off, because the corpus's 256 pictures repeat behind every URL (different bytes,
    # same pixels) and would make groups of thousands, which is not what the stage meets in practice.
    params["validate"].update(
        min_short_side=32,
        min_long_side=32,
        missing_dpi="accept",
        min_kb_per_pixel=0.0,
        near_duplicates={"enabled": False, "max_distance": 4},
        cache_dir=".easel/cache/validate",
    )
    # caption: the tiny offline models, built once in the repository (each size's folder would
    # otherwise build its own); the profile sets the model paths, so they are set there.
    tiny = build_tiny_models(REPO / TINY_ROOT)
    params["profile"] = "tiny"
    params["profiles"]["tiny"]["models"].update(blip=str(tiny / "blip"), tagger=str(tiny / "tagger"))
    if caption_batch_size:
        params["caption"]["batch_size"] = caption_batch_size
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work / "params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 500_000])
    parser.add_argument("--stages", nargs="+", default=["download"], choices=["download", "validate", "caption"])
    parser.add_argument("--work-dir", type=Path, default=BENCH / "stage-scale")
    parser.add_argument("--out", type=Path, default=BENCH / "stage-scale.json")
    parser.add_argument("--keep", action="store_true", help="keep each size's folder")
    parser.add_argument(
        "--caption-batch-size",
        type=int,
        help="caption.batch_size (default: params.yaml's); the tiny BLIP never ends a caption early, so "
        "its beam search runs all max_new_tokens steps per batch, whatever the batch holds",
    )
    args = parser.parse_args()

    corpus = BENCH / "small-corpus"
    small_corpus(corpus)
    server, port = start_image_server(corpus, latency=0)
    env = os.environ | {"PYTHONPATH": str(REPO), "EASEL_NO_PROGRESS": "1"}
    rows = []
    try:
        shutil.rmtree(args.work_dir, ignore_errors=True)
        for n in args.sizes:
            work = args.work_dir / f"n{n}"
            params = download_project(work, n, port, args.caption_batch_size)
            for stage in args.stages:
                command = [sys.executable, "-m", "components.cli", "--params", str(params), stage]
                result = run_sampled(command, work, env)
                metrics = json.loads((work / "metrics" / f"{stage}.json").read_text()) if result["exit"] == 0 else {}
                done = metrics.get("ok_rows", metrics.get("accepted", metrics.get("captioned")))
                row = {"stage": stage, "urls": n, **result, "done": done, "urls_per_second": n / result["seconds"]}
                if result["exit"] == 0:
                    row.pop("log_tail")
                rows.append(row)
                print(json.dumps(row), flush=True)
                if result["exit"] != 0:
                    break
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = "python -m benchmarks.stage_scale " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps({"machine": machine, "command": command, "rows": rows}, indent=2))
    print(f"\nmachine: {machine}\n")
    print("| stage | URLs | peak RSS, all processes | peak RSS, main process | wall | URLs (rows) per second |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['stage']} | {row['urls']:,} | {row['peak_tree_mb']:.0f} MB | {row['peak_main_mb']:.0f} MB | "
            f"{row['seconds']:.0f} s | {row['urls_per_second']:.0f} |"
        )


if __name__ == "__main__":
    main()
