"""The validate stage: metadata from headers, a real GX suite, every failed rule listed."""

import json
import struct
import zlib

import pandas as pd
import pytest
from PIL import Image

from components.config import ValidateParams
from components.errors import EaselError
from components.validate import run_validate
from tests.helpers import encode, make_download_dir, noise


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def corpus() -> dict[str, bytes]:
    good = encode(noise(600, 600), "PNG", dpi=(96, 96))
    return {
        "good.png": good,
        "good-jpeg.jpg": encode(noise(700, 520, 1), "JPEG", quality=95, dpi=(300, 300)),
        "small.png": encode(noise(300, 300, 2), "PNG", dpi=(96, 96)),
        "wide.png": encode(noise(1100, 600, 3), "PNG", dpi=(96, 96)),
        "lowdpi.png": encode(noise(600, 600, 4), "PNG", dpi=(72, 72)),
        "nodpi.png": encode(noise(600, 600, 5), "PNG"),
        "flat.jpg": encode(Image.new("RGB", (800, 800), (120, 120, 120)), "JPEG", quality=30, dpi=(96, 96)),
        "truncated.png": good[: len(good) // 2],
        "bomb.png": png_bomb(),
        "tiny-and-72dpi.png": encode(noise(100, 80, 6), "PNG", dpi=(72, 72)),
    }


def run(tmp_path, files=None, **kw):
    download = make_download_dir(tmp_path / "download", files or corpus())
    params = ValidateParams(out_dir=str(tmp_path / "validate"), **kw)
    summary = run_validate(params, download, tmp_path / "metrics.json", progress=False)
    accepted = pd.read_parquet(tmp_path / "validate" / "accepted.parquet")
    rejected = pd.read_parquet(tmp_path / "validate" / "rejected.parquet")
    reasons = {u.rsplit("/", 1)[-1]: list(r) for u, r in zip(rejected["url"], rejected["reasons"], strict=True)}
    return summary, {u.rsplit("/", 1)[-1] for u in accepted["url"]}, reasons


def test_each_file_gets_every_rule_it_breaks(tmp_path):
    _, accepted, reasons = run(tmp_path)
    assert accepted == {"good.png", "good-jpeg.jpg"}
    assert reasons == {
        "small.png": ["width", "height"],
        "wide.png": ["width"],
        "lowdpi.png": ["dpi"],
        "nodpi.png": ["dpi_missing"],
        "flat.jpg": ["kb_per_pixel"],
        "truncated.png": ["decodable"],
        "bomb.png": ["decodable"],  # refused before decoding; size unknown, so only this rule
        "tiny-and-72dpi.png": ["width", "height", "dpi"],
    }
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accepted"] == 2 and metrics["rejected"] == 8
    assert metrics["rejected_by_rule"]["width"] == 3
    report = (tmp_path / "validate" / "report.html").read_text()
    assert "Rejected images, by rule" in report and "data:image/png;base64" in report
    gx = json.loads((tmp_path / "validate" / "gx_results.json").read_text())
    assert len(gx["results"]) == 6 and gx["success"] is False


def test_missing_dpi_can_be_accepted_by_policy(tmp_path):
    _, accepted, reasons = run(tmp_path, missing_dpi="accept")
    assert "nodpi.png" in accepted and "dpi_missing" not in {r for rs in reasons.values() for r in rs}


def test_thresholds_come_from_params(tmp_path):
    _, accepted, _ = run(tmp_path, min_dpi=50, min_width=256, min_height=256)
    assert {"lowdpi.png", "small.png", "good.png"} <= accepted


def test_empty_accepted_set_fails_after_writing_the_report(tmp_path):
    files = {k: v for k, v in corpus().items() if k in ("small.png", "truncated.png")}
    with pytest.raises(EaselError, match=r"only 0 of 2 images passed .*report\.html"):
        run(tmp_path, files)
    assert (tmp_path / "validate" / "rejected.parquet").is_file()
    assert (tmp_path / "validate" / "report.html").is_file()


def test_metadata_is_read_from_headers(tmp_path):
    run(tmp_path, files={"good-jpeg.jpg": corpus()["good-jpeg.jpg"]})
    row = pd.read_parquet(tmp_path / "validate" / "accepted.parquet").iloc[0]
    assert (row["format"], row["mode"], row["width"], row["height"], row["dpi"]) == ("JPEG", "RGB", 700, 520, 300.0)
    assert row["kb_per_pixel"] == pytest.approx(row["bytes"] / 1024 / (700 * 520))
