"""The validate stage on a corpus of awkward files: each ends accepted or rejected with the
right reasons, none crashes the stage, and the accepted copies are ready for training."""

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import ValidateParams
from components.plumbing.errors import EaselError
from components.validate import run_validate
from components.validate.dedupe import near_duplicate_groups
from components.validate.inspect import hamming
from tests.helpers import encode, make_download_dir, noise


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def jpeg_dots_per_cm(image: Image.Image, per_cm: int) -> bytes:
    data = bytearray(encode(image, "JPEG", quality=95, dpi=(300, 300)))
    i = data.find(b"JFIF\x00")
    data[i + 7] = 2  # JFIF units: dots per centimetre
    data[i + 8 : i + 12] = struct.pack(">HH", per_cm, per_cm)
    return bytes(data)


def photo(name: str, size: int) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size))


def corpus() -> dict[str, bytes]:
    good = encode(noise(600, 600), "PNG", dpi=(96, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    palette = noise(640, 600, 9).convert("P", palette=Image.ADAPTIVE, colors=64)
    sixteen = Image.fromarray((np.random.default_rng(3).integers(0, 65535, (600, 620))).astype(np.uint16))
    frames = [noise(600, 600, s).convert("P") for s in (20, 21)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "good.png": good,
        "good-copy.png": good,  # the same bytes again: an exact duplicate
        "jpeg-300dpi.jpg": encode(noise(700, 520, 1), "JPEG", quality=95, dpi=(300, 300)),
        "small.png": encode(noise(300, 300, 2), "PNG", dpi=(96, 96)),
        "wide.png": encode(noise(1100, 600, 3), "PNG", dpi=(96, 96)),
        "lowdpi.png": encode(noise(600, 600, 4), "PNG", dpi=(72, 72)),
        "nodpi.png": encode(noise(600, 600, 5), "PNG"),
        "flat.jpg": encode(Image.new("RGB", (800, 800), (120, 120, 120)), "JPEG", quality=30, dpi=(96, 96)),
        "zero.png": b"",
        "html.jpg": b"<!doctype html><html><body>not an image</body></html>",
        "truncated.jpg": encode(noise(640, 640, 6), "JPEG", quality=95, dpi=(96, 96))[:60_000],
        "bomb.png": png_bomb(),
        "cmyk.jpg": encode(noise(600, 600, 7).convert("CMYK"), "JPEG", quality=95, dpi=(96, 96)),
        "sixteen-bit.png": encode(sixteen, "PNG", dpi=(96, 96)),
        "palette-transparent.png": encode(palette, "PNG", dpi=(96, 96), transparency=0),
        "rotated.jpg": encode(noise(800, 600, 8), "JPEG", quality=95, dpi=(96, 96), exif=exif.tobytes()),
        "dots-per-cm.jpg": jpeg_dots_per_cm(noise(600, 600, 10), 118),
        "animated.gif": gif.getvalue(),
        "astronaut-big.png": encode(photo("astronaut", 760), "PNG", dpi=(96, 96)),
        "astronaut-small.png": encode(photo("astronaut", 600), "PNG", dpi=(96, 96)),
        "coffee.png": encode(photo("coffee", 640), "PNG", dpi=(96, 96)),
    }


def run(tmp_path, files=None, **kw):
    download = make_download_dir(tmp_path / "download", files or corpus())
    params = ValidateParams(out_dir=str(tmp_path / "validate"), **({"min_accepted_share": 0.0} | kw))
    summary = run_validate(params, download, tmp_path / "metrics.json", progress=False)
    accepted = pd.read_parquet(tmp_path / "validate" / "accepted.parquet")
    rejected = pd.read_parquet(tmp_path / "validate" / "rejected.parquet")
    reasons = {u.rsplit("/", 1)[-1]: list(r) for u, r in zip(rejected["url"], rejected["reasons"], strict=True)}
    return summary, accepted, reasons


def name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def test_each_awkward_file_ends_with_the_right_verdict(tmp_path):
    _, accepted, reasons = run(tmp_path)
    assert set(accepted["url"].map(name)) == {
        "good.png",
        "jpeg-300dpi.jpg",
        "cmyk.jpg",
        "sixteen-bit.png",
        "palette-transparent.png",
        "rotated.jpg",
        "dots-per-cm.jpg",
        "astronaut-big.png",
        "coffee.png",
    }
    assert reasons == {
        "good-copy.png": ["exact_duplicate"],
        "small.png": ["short_side", "long_side"],
        "wide.png": ["long_side"],
        "lowdpi.png": ["dpi"],
        "nodpi.png": ["dpi_missing"],
        "flat.jpg": ["kb_per_pixel"],
        "zero.png": ["decodable"],
        "html.jpg": ["decodable"],
        "truncated.jpg": ["decodable", "kb_per_pixel"],  # its header's size vs the bytes that remain
        "bomb.png": ["decodable"],  # refused before decoding; its size is unknown, so only this rule
        "animated.gif": ["animated", "dpi_missing"],  # GIF has no DPI field
        "astronaut-small.png": ["near_duplicate"],
    }
    rejected = pd.read_parquet(tmp_path / "validate" / "rejected.parquet").set_index(accepted.columns[2])
    near = rejected.loc[rejected.index.str.endswith("astronaut-small.png")].iloc[0]
    assert near["near_duplicate_note"].endswith("kept one is larger (760x760 vs 600x600)")
    assert "astronaut-big.png" in near["near_duplicate_note"]
    dup = rejected.loc[rejected.index.str.endswith("good-copy.png")].iloc[0]
    assert dup["duplicate_of"].endswith("/good.png")
    bomb = rejected.loc[rejected.index.str.endswith("bomb.png")].iloc[0]
    assert bomb["decode_error"].startswith("decompression_bomb")


def test_metadata_comes_from_headers_with_units_converted(tmp_path):
    _, accepted, _ = run(tmp_path)
    rows = accepted.set_index(accepted["url"].map(name))
    assert rows.loc["dots-per-cm.jpg", "dpi"] == pytest.approx(299.7, abs=0.1)  # 118 dots/cm
    assert (rows.loc["jpeg-300dpi.jpg", "format"], rows.loc["jpeg-300dpi.jpg", "mode"]) == ("JPEG", "RGB")
    assert rows.loc["rotated.jpg", "exif_orientation"] == 6
    assert rows.loc["cmyk.jpg", "mode"] == "CMYK" and rows.loc["sixteen-bit.png", "mode"] == "I;16"
    assert rows.loc["jpeg-300dpi.jpg", "aspect_ratio"] == pytest.approx(700 / 520)
    assert rows.loc["good.png", "kb_per_pixel"] == pytest.approx(rows.loc["good.png", "bytes"] / 1024 / 600**2)
    assert all(len(h) == 16 for h in accepted["phash"])


def test_accepted_copies_are_rgb_upright_and_the_raw_store_untouched(tmp_path):
    _, accepted, _ = run(tmp_path)
    rows = accepted.set_index(accepted["url"].map(name))
    for converted in ("cmyk.jpg", "sixteen-bit.png", "palette-transparent.png", "rotated.jpg"):
        path = rows.loc[converted, "image_path"]
        assert path.startswith(str(tmp_path / "validate" / "images")), converted
        with Image.open(path) as image:
            assert image.mode == "RGB", converted
            if converted == "rotated.jpg":
                assert image.size == (600, 800)  # EXIF orientation 6 applied
        raw = tmp_path / "download" / rows.loc[converted, "path"]
        assert hashlib.sha256(raw.read_bytes()).hexdigest() == rows.loc[converted, "sha256"]  # raw untouched
    assert rows.loc["good.png", "image_path"] == str(tmp_path / "download" / rows.loc["good.png", "path"])
    with Image.open(rows.loc["palette-transparent.png", "image_path"]) as image:
        assert image.getpixel((0, 0)) != (0, 0, 0)  # transparency flattened on white, not black


def test_missing_dpi_policies(tmp_path):
    files = {"nodpi.png": corpus()["nodpi.png"], "good.png": corpus()["good.png"]}
    _, accepted, reasons = run(tmp_path / "accept", files, missing_dpi="accept")
    assert len(accepted) == 2 and reasons == {}
    _, _, reasons = run(tmp_path / "assume72", files, missing_dpi={"assume": 72})
    assert reasons == {"nodpi.png": ["dpi"]}  # taken as 72 dpi, which is below 96
    _, accepted, _ = run(tmp_path / "assume300", files, missing_dpi={"assume": 300})
    assert len(accepted) == 2


def test_the_tables_and_report_state_the_dpi_and_animation_policy_of_each_image(tmp_path):
    files = {n: corpus()[n] for n in ("nodpi.png", "good.png", "animated.gif")}
    _, accepted, _ = run(tmp_path / "accept", files, missing_dpi="accept", allow_animated=True)
    policy = dict(
        zip(accepted["url"].map(name), zip(accepted["dpi_policy"], accepted["frames_policy"], strict=True), strict=True)
    )
    assert policy["nodpi.png"][0] == "missing: accepted unchecked (missing_dpi: accept)"
    assert policy["good.png"] == ("stated: 96", "still")
    assert policy["animated.gif"][1] == "animated: only the first frame is trained on (allow_animated: true)"
    html = (tmp_path / "accept" / "validate" / "report.html").read_text()
    assert "missing: accepted unchecked (missing_dpi: accept)" in html and "only the first frame" in html

    run(tmp_path / "strict", files)  # the defaults: missing DPI and animations are rejected, and say so
    rejected = pd.read_parquet(tmp_path / "strict" / "validate" / "rejected.parquet").set_index("url")
    assert set(rejected["dpi_policy"]) == {"missing: rejected (missing_dpi: reject)"}
    assert "animated: rejected (allow_animated: false)" in set(rejected["frames_policy"])


def test_an_empty_manifest_is_an_error_and_replaces_nothing(tmp_path):
    run(tmp_path, {"good.png": corpus()["good.png"]})
    before = {p: p.read_bytes() for p in (tmp_path / "validate").rglob("*") if p.is_file()}
    manifest = pd.read_parquet(tmp_path / "download" / "manifest.parquet")
    manifest.iloc[0:0].to_parquet(tmp_path / "download" / "manifest.parquet")  # a download of an empty list
    params = ValidateParams(out_dir=str(tmp_path / "validate"))
    with pytest.raises(EaselError, match=r"manifest.parquet lists no downloaded images \(0 rows"):
        run_validate(params, tmp_path / "download", progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "validate").rglob("*") if p.is_file()}
    assert after == before
    # Allowed to be empty, it writes empty tables that keep their columns.
    empty = ValidateParams(out_dir=str(tmp_path / "empty"), min_accepted=0, min_accepted_share=0.0)
    assert run_validate(empty, tmp_path / "download", progress=False).rows == 0
    assert {"url", "sha256", "image_path", "reasons"} <= set(pd.read_parquet(tmp_path / "empty" / "rejected.parquet"))
    manifest.drop(columns=["sha256", "bytes"]).to_parquet(tmp_path / "download" / "manifest.parquet")
    with pytest.raises(
        EaselError, match=r"manifest.parquet lacks the column\(s\) sha256, bytes; rerun the download stage"
    ):
        run_validate(params, tmp_path / "download", progress=False)
    (tmp_path / "download" / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(EaselError, match=r"manifest.parquet: cannot be read"):
        run_validate(params, tmp_path / "download", progress=False)


def test_caption_required_only_when_the_source_has_captions(tmp_path):
    files = {f"img{i}.png": encode(noise(600, 600, 40 + i), "PNG", dpi=(96, 96)) for i in range(3)}
    download = make_download_dir(tmp_path / "download", files)
    manifest = pd.read_parquet(download / "manifest.parquet")
    manifest["source"] = ["captioned", "captioned", "plain"]
    manifest["src_caption"] = pd.array(["a cat", "  ", pd.NA], dtype="string")
    manifest.to_parquet(download / "manifest.parquet")
    params = ValidateParams(out_dir=str(tmp_path / "validate"), min_accepted_share=0)
    run_validate(params, download, progress=False)
    rejected = pd.read_parquet(tmp_path / "validate" / "rejected.parquet")
    assert [(name(u), list(r)) for u, r in zip(rejected["url"], rejected["reasons"], strict=True)] == [
        ("img1.png", ["caption_missing"])
    ]


def test_outputs_metrics_and_data_docs(tmp_path):
    run(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["images"], metrics["accepted"], metrics["rejected"]) == (21, 9, 12)
    assert metrics["rejected_by_rule"]["decodable"] == 4 and metrics["rejected_by_rule"]["near_duplicate"] == 1
    docs = tmp_path / "validate" / "data_docs" / "index.html"
    assert docs.is_file() and "easel_image_rules" in docs.read_text()
    html = (tmp_path / "validate" / "report.html").read_text()
    assert "Rejected images, by rule" in html and "near_duplicate" in html and "data_docs/index.html" in html
    gx = json.loads((tmp_path / "validate" / "gx_results.json").read_text())
    assert gx["success"] is False and len(gx["results"]) >= 12


def test_the_accepted_share_floor_stops_a_broken_source(tmp_path):
    files = {k: v for k, v in corpus().items() if k in ("small.png", "truncated.jpg", "good.png")}
    with pytest.raises(EaselError, match=r"only 1 of 3 images passed \(33%.*min_accepted_share 50%"):
        run(tmp_path, files, min_accepted_share=0.5)
    assert (tmp_path / "validate" / "report.html").is_file()  # the report says why


def test_nothing_downloaded_is_a_clear_error(tmp_path):
    download = tmp_path / "download"
    download.mkdir()
    pd.DataFrame(
        {
            "source": ["s"],
            "row": [0],
            "url": ["http://h/x"],
            "status": ["http_404"],
            "sha256": [None],
            "path": [None],
            "bytes": [None],
        }
    ).to_parquet(download / "manifest.parquet")
    with pytest.raises(EaselError, match=r"lists no downloaded images \(1 rows, none ok\); fix the download"):
        run_validate(ValidateParams(out_dir=str(tmp_path / "validate")), download, progress=False)
    assert not (tmp_path / "validate").exists()  # nothing written


def test_near_duplicate_grouping_is_transitive_and_exact():
    a = "0" * 16
    b = f"{0b111:016x}"  # 3 bits from a
    c = f"{0b111111:016x}"  # 3 bits from b, 6 from a
    far = "f" * 16
    assert hamming(a, c) == 6
    assert near_duplicate_groups([a, b, c, far, None], max_distance=3) == [[0, 1, 2]]
    assert near_duplicate_groups([a, c], max_distance=3) == []


def test_curation_keeps_the_top_share_by_aesthetic_score(tmp_path, tiny_models):
    from tests.test_models import tiny_params

    files = {f"img{i}.png": encode(noise(600, 600, 60 + i), "PNG", dpi=(96, 96)) for i in range(6)}
    download = make_download_dir(tmp_path / "download", files)
    params = ValidateParams(
        out_dir=str(tmp_path / "validate"), min_accepted_share=0, curate={"enabled": True, "keep_top_share": 0.5}
    )
    summary = run_validate(params, download, progress=False, models=tiny_params(tiny_models))
    assert (summary.accepted, summary.per_rule) == (3, {"curated_out": 3})
    accepted = pd.read_parquet(tmp_path / "validate" / "accepted.parquet")
    rejected = pd.read_parquet(tmp_path / "validate" / "rejected.parquet")
    assert accepted["aesthetic_score"].min() >= rejected["aesthetic_score"].max()  # the best half kept


def test_the_report_shows_a_fixed_sample_of_thumbnails_not_every_image(tmp_path, monkeypatch):
    """The report's thumbnails are a sample per section, the same on every run, and say how many
    there are and where the rest is: 20,000 images as cards made a 318 MB page and took 2 GB to
    build (benchmarks/RESULTS.md)."""
    from components.validate import stage

    monkeypatch.setattr(stage, "REPORT_ACCEPTED_CARDS", 3)
    monkeypatch.setattr(stage, "REPORT_CARDS_PER_RULE", 2)
    run(tmp_path)
    html = (tmp_path / "validate" / "report.html").read_text()
    accepted = html.split("Accepted images", 1)[1]
    assert accepted.count('class="card"') == 3 and "3 of 9 shown" in accepted
    assert "accepted.parquet" in accepted
    rejected = html.split("Rejected images, by rule", 1)[1].split("Accepted images", 1)[0]
    assert "2 of 4 shown" in rejected  # decodable: 4 images, 2 cards
    for sheet in rejected.split("<h3>")[1:]:
        assert sheet.count('class="card"') <= 2
    run(tmp_path / "again")
    again = (tmp_path / "again" / "validate" / "report.html").read_text()
    assert again.split("Accepted images", 1)[1].count('class="card"') == 3
    assert [line for line in accepted.split("card") if "http" in line][:3] == [
        line for line in again.split("Accepted images", 1)[1].split("card") if "http" in line
    ][:3]  # the same sample on every run


def test_a_manifest_judged_in_chunks_gives_the_outputs_of_one_pass(tmp_path, monkeypatch):
    """Validate reads the manifest CHUNK_ROWS rows at a time, so that its memory does not grow with
    the data set. Chunks of 3 rows, with an exact duplicate and a near-duplicate pair far apart in
    the list, give the same accepted and rejected tables, GX result, metrics and report as one chunk."""
    from components.validate import stage

    download = make_download_dir(tmp_path / "download", corpus())
    manifest = pd.read_parquet(download / "manifest.parquet")
    first = manifest.iloc[[0]].assign(url="http://h/good-again.png", row=len(manifest))
    later = manifest["url"].str.endswith(("good-copy.png", "astronaut-small.png"))
    manifest = pd.concat([manifest[~later], manifest[later], first], ignore_index=True)
    manifest.to_parquet(download / "manifest.parquet")

    def judge(name: str) -> tuple[dict, str]:
        params = ValidateParams(
            out_dir=str(tmp_path / name), cache_dir=str(tmp_path / f"{name}-cache"), min_accepted_share=0.0
        )
        run_validate(params, download, tmp_path / f"{name}.json", progress=False)
        tables = {
            kind: pd.read_parquet(tmp_path / name / f"{kind}.parquet").replace(str(tmp_path / name), "OUT", regex=True)
            for kind in ("accepted", "rejected")
        }
        gx = json.loads((tmp_path / name / "gx_results.json").read_text())
        html = (tmp_path / name / "report.html").read_text().replace(str(tmp_path / name), "OUT")
        return {**tables, "gx": [(r["success"], r["result"]) for r in gx["results"]], "success": gx["success"]}, html

    whole, whole_html = judge("whole")
    monkeypatch.setattr(stage, "CHUNK_ROWS", 3)
    chunked, chunked_html = judge("chunked")
    for kind in ("accepted", "rejected"):
        pd.testing.assert_frame_equal(chunked[kind], whole[kind])
    assert chunked["gx"] == whole["gx"] and chunked["success"] == whole["success"] is False
    assert json.loads((tmp_path / "chunked.json").read_text()) == json.loads((tmp_path / "whole.json").read_text())
    assert chunked_html == whole_html
    reasons = dict(zip(whole["rejected"]["url"].map(name), whole["rejected"]["reasons"].map(list), strict=True))
    assert reasons["good-copy.png"] == reasons["good-again.png"] == ["exact_duplicate"]
    assert reasons["astronaut-small.png"] == ["near_duplicate"]
    runs = list((tmp_path / "chunked" / "data_docs" / "validations").rglob("*.html"))
    assert len(runs) == -(-len(manifest) // 3)  # one GX validation per chunk, all in the Data Docs


def test_the_inspection_cache_keeps_what_a_killed_run_committed_and_folds_its_parts(tmp_path):
    """Inspection rows live in SQLite parts, one file per writer (not one per image). A run killed
    mid-way keeps every row it committed (COMMIT_ROWS at a time); a part that cannot be read is
    skipped, its files inspected again; the stage folds every part into one file, rows kept."""
    import subprocess
    import sys

    from components.validate.inspect import COMMIT_ROWS, EMPTY_ROW, InspectionCache
    from tests.conftest import REPO

    pixels = ValidateParams().max_image_pixels  # the stage's own rows, so that it folds these parts
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(COMMIT_ROWS + 50)]
    killed = f"""
import os
from components.validate.inspect import EMPTY_ROW, InspectionCache
cache = InspectionCache({str(tmp_path / "cache")!r}, {pixels})
for i, sha in enumerate({shas!r}):
    cache.put(sha, dict(EMPTY_ROW, width=i))
os._exit(9)  # killed before it could commit the last rows
"""
    proc = subprocess.run([sys.executable, "-c", killed], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    with InspectionCache(tmp_path / "cache", pixels) as cache:
        kept = [cache.get(sha) for sha in shas]
        assert [row is not None for row in kept] == [True] * COMMIT_ROWS + [False] * 50
        assert [row["width"] for row in kept[:COMMIT_ROWS]] == list(range(COMMIT_ROWS))
        for sha in shas[COMMIT_ROWS:]:  # the next run inspects only those
            cache.put(sha, dict(EMPTY_ROW, width=-1))
    (cache.root / "broken.sqlite").write_bytes(b"not a database")
    # A writer killed mid-commit, with pages already in its file: SQLite's "hot" journal rolls them back.
    hot = f"""
import os, sqlite3
db = sqlite3.connect({str(cache.root / "hot.sqlite")!r})
db.execute("PRAGMA cache_size = 1")  # spill pages into the file before the commit
db.execute("CREATE TABLE rows (sha256 TEXT PRIMARY KEY, row TEXT NOT NULL) WITHOUT ROWID")
for i in range(500):
    db.execute("INSERT INTO rows VALUES (?, ?)", (f"{{i:064x}}", "{{}}" + " " * 300))
os._exit(9)
"""
    assert subprocess.run([sys.executable, "-c", hot], capture_output=True).returncode == 9
    assert (cache.root / "hot.sqlite-journal").stat().st_size > 0
    with InspectionCache(tmp_path / "cache", pixels) as cache:
        assert all(cache.get(sha) is not None for sha in shas)
        assert cache.get(hashlib.sha256(b"never seen").hexdigest()) is None
    assert len(list(cache.root.glob("*.sqlite"))) == 4

    # The stage folds these parts and its own into one (and drops the unreadable one).
    download = make_download_dir(tmp_path / "download", corpus())
    params = ValidateParams(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), min_accepted_share=0.0)
    run_validate(params, download, tmp_path / "m.json", progress=False)
    (part,) = cache.root.iterdir()  # no journal left either
    with InspectionCache(tmp_path / "cache", pixels) as cache:
        assert [cache.get(sha)["width"] for sha in shas] == [*range(COMMIT_ROWS), *[-1] * 50]
    assert part.suffix == ".sqlite"
