"""Archive sources (issue 15, item 5): zip, tar, tar.gz and WebDataset shards, local, by URL and in S3,
read member by member into the content-addressed store, with sidecar captions; malicious members and
bomb-sized members refused and reported."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import struct
import subprocess
import tarfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import DownloadParams, StorageParams
from components.download import archives, run_download
from components.download.archives import expand_braces, unsafe_name, webdataset_key
from components.plumbing.errors import ConfigError, EaselError
from tests.http_fixtures import png_bytes

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
IMAGES = {name: png_bytes((40 * i, 90, 200 - 40 * i)) for i, name in enumerate(["p0", "p1", "p2", "w0", "w1", "w2"])}
BOMB = b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * MAX_BYTES)  # compresses to a few KB


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tar(path: Path, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        _tar_add(tar, "p0.txt", b"a red poster\n")  # a sidecar before its image: order does not matter
        _tar_add(tar, "p0.png", IMAGES["p0"])
        _tar_add(tar, "sub/p1.png", IMAGES["p1"])
        _tar_add(tar, "sub/p1.caption", b"a travel poster")
        _tar_add(tar, "p2.png", IMAGES["p2"])  # no sidecar
        _tar_add(tar, "notes.md", b"# not an image, not a sidecar")
        _tar_add(tar, "../evil.png", IMAGES["w0"])
        _tar_add(tar, "/etc/evil.png", IMAGES["w0"])
        _tar_add(tar, "link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _tar_add(tar, "hard.png", kind=tarfile.LNKTYPE, link="p0.png")
        _tar_add(tar, "big.png", BOMB)
        _tar_add(tar, "fake.png", b"<!doctype html><p>no image here</p>")
    return path


TAR_OUTCOMES = [
    ("p0.png", "ok", "a red poster"),
    ("sub/p1.png", "ok", "a travel poster"),
    ("p2.png", "ok", None),
    ("../evil.png", "unsafe_member", None),
    ("/etc/evil.png", "unsafe_member", None),
    ("link.png", "unsafe_member", None),
    ("hard.png", "unsafe_member", None),
    ("big.png", "too_large", None),
    ("fake.png", "not_image", None),
]


def write_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("posters/p0.png", IMAGES["p0"])
        z.writestr("posters/p0.json", json.dumps({"caption": "a red poster", "url": "http://x"}))
        z.writestr("posters/p1.png", IMAGES["p1"])
        z.writestr("posters/p1.txt", "a travel poster")
        z.writestr("posters/p1.json", json.dumps({"caption": "the .txt wins"}))
        z.writestr("..\\evil.png", IMAGES["w0"])  # a Windows-made traversal
        z.writestr("C:/evil.png", IMAGES["w0"])
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16  # how zip (Info-ZIP) stores a symlink
        z.writestr(link, "/etc/passwd")
        z.writestr("bomb.png", BOMB)
    return path


ZIP_OUTCOMES = [
    ("posters/p0.png", "ok", "a red poster"),
    ("posters/p1.png", "ok", "a travel poster"),
    ("..\\evil.png", "unsafe_member", None),
    ("C:/evil.png", "unsafe_member", None),
    ("link.png", "unsafe_member", None),
    ("bomb.png", "too_large", None),
]


def write_shards(folder: Path) -> Path:
    """Two WebDataset shards: samples grouped by key, captions in .txt or in .json, one image per sample or two."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "posters-000000.tar", "w") as tar:
        for key, name in (("000000", "w0"), ("000001", "w1")):
            _tar_add(tar, f"{key}.png", IMAGES[name])
            _tar_add(tar, f"{key}.txt", f"sample {key}".encode())
            _tar_add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
    with tarfile.open(folder / "posters-000001.tar", "w") as tar:
        _tar_add(tar, "000002.png", IMAGES["w2"])
        _tar_add(tar, "000002.seg.png", IMAGES["w2"] + b"#seg")  # same key, another extension
        _tar_add(tar, "000002.json", json.dumps({"caption": "sample 000002"}).encode())
    return folder


SHARD_OUTCOMES = [
    ("000000.png", "ok", "sample 000000"),
    ("000001.png", "ok", "sample 000001"),
    ("000002.png", "ok", "sample 000002"),
    ("000002.seg.png", "ok", "sample 000002"),  # by its WebDataset key
]


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archives")
    write_tar(folder / "posters.tar")
    write_tar(folder / "posters.tar.gz", "w:gz")
    write_zip(folder / "posters.zip")
    write_shards(folder / "wds")
    return folder


def params(tmp_path: Path, sources: list[dict], **kw) -> DownloadParams:
    base = {"sources": sources, "out_dir": str(tmp_path / "out"), "max_bytes": MAX_BYTES, "retries": 0}
    return DownloadParams(**(base | {"allow_networks": ["127.0.0.0/8"]} | kw))


def rows_of(manifest: pd.DataFrame, source: str) -> list[tuple]:
    mine = manifest[manifest["source"] == source]
    caption = mine["src_caption"].astype(object).where(mine["src_caption"].notna(), None)
    member = mine["src_member"].astype(object).where(mine["src_member"].notna(), None)
    return list(zip(member, mine["status"], caption, strict=True))


def manifest_of(tmp_path: Path) -> pd.DataFrame:
    return pd.read_parquet(tmp_path / "out" / "manifest.parquet")


def test_local_archives_and_shards_become_manifest_rows(tmp_path, archive_dir, monkeypatch):
    sources = [
        {"name": "tar", "path": str(archive_dir / "posters.tar")},
        {"name": "tgz", "path": str(archive_dir / "posters.tar.gz")},
        {"name": "zip", "path": str(archive_dir / "posters.zip")},
        {"name": "wds", "path": str(archive_dir / "wds" / "posters-{000000..000001}.tar")},
    ]
    summary = run_download(params(tmp_path, sources), tmp_path / "metrics.json", progress=False)
    manifest = manifest_of(tmp_path)
    assert rows_of(manifest, "tar") == TAR_OUTCOMES and rows_of(manifest, "tgz") == TAR_OUTCOMES
    assert rows_of(manifest, "zip") == ZIP_OUTCOMES and rows_of(manifest, "wds") == SHARD_OUTCOMES
    assert manifest["source"].tolist() == ["tar"] * 9 + ["tgz"] * 9 + ["zip"] * 6 + ["wds"] * 4  # params order
    assert manifest.groupby("source", sort=False)["row"].apply(list).to_dict()["wds"] == [0, 1, 2, 3]
    ok = manifest[manifest["status"] == "ok"]
    for row in ok.itertuples():  # content-addressed: the name is the sha256 of the bytes, never the member's
        stored = tmp_path / "out" / row.path
        assert stored.name == f"{row.sha256}.png" and stored.read_bytes().startswith(b"\x89PNG")
    assert ok.loc[ok["src_member"] == "p0.png", "sha256"].nunique() == 1  # the same bytes in two archives: once
    assert not list((tmp_path / "out").rglob("evil*")) and not (tmp_path / "evil.png").exists()
    bad = manifest.drop_duplicates("src_member").set_index("src_member")["error"]
    assert bad["../evil.png"] == "member '../evil.png' refused: a '..' component in its path"
    assert bad["/etc/evil.png"].endswith("an absolute path") and bad["C:/evil.png"].endswith("an absolute path")
    assert bad["link.png"].endswith("a symbolic or hard link")
    assert bad["bomb.png"] == f"member of {len(BOMB)} bytes > {MAX_BYTES}"
    assert set(manifest.loc[manifest["source"] == "wds", "src_key"]) == {"000000", "000001", "000002"}
    assert manifest.loc[manifest["src_member"] == "000002.seg.png", "src_sidecar"].item() == "000002.json"
    assert summary.statuses == {"ok": 12, "unsafe_member": 11, "too_large": 3, "not_image": 2}
    assert json.loads((tmp_path / "metrics.json").read_text())["outcomes"]["unsafe_member"] == 11

    # A rerun reads no archive (each finished one is indexed) and writes the same manifest.
    monkeypatch.setattr(archives, "read_archive", lambda *a, **k: pytest.fail("an unchanged archive was read again"))
    run_download(params(tmp_path, sources), progress=False)
    pd.testing.assert_frame_equal(manifest, manifest_of(tmp_path))


def test_a_member_pattern_keeps_only_the_images_it_matches(tmp_path, archive_dir):
    sources = [
        {"name": "posters", "path": str(archive_dir / "posters.zip") + "#posters/*"},
        {"name": "all", "path": str(archive_dir / "posters.zip")},
    ]
    run_download(params(tmp_path, sources), progress=False)
    manifest = manifest_of(tmp_path)
    # Refused members are reported whatever the pattern; the bomb does not match and is not even looked at.
    assert rows_of(manifest, "posters") == [r for r in ZIP_OUTCOMES if r[0] != "bomb.png"]
    assert rows_of(manifest, "all") == ZIP_OUTCOMES  # another pattern, another index
    assert len(list((tmp_path / "out" / "archives").iterdir())) == 2


def test_a_changed_or_lost_archive_is_read_again(tmp_path, archive_dir):
    source = tmp_path / "one.tar"
    write_tar(source)
    run_download(params(tmp_path, [{"name": "one", "path": str(source)}]), progress=False)
    first = manifest_of(tmp_path)
    with tarfile.open(source, "w") as tar:  # the same name, other content
        _tar_add(tar, "new.png", IMAGES["w1"])
    run_download(params(tmp_path, [{"name": "one", "path": str(source)}]), progress=False)
    assert rows_of(manifest_of(tmp_path), "one") == [("new.png", "ok", None)]
    write_tar(source)
    run_download(params(tmp_path, [{"name": "one", "path": str(source)}]), progress=False)
    for path in first.loc[first["status"] == "ok", "path"]:
        (tmp_path / "out" / path).unlink(missing_ok=True)  # the store lost its files: the index no longer holds
    run_download(params(tmp_path, [{"name": "one", "path": str(source)}]), progress=False)
    again = manifest_of(tmp_path)
    assert rows_of(again, "one") == TAR_OUTCOMES
    assert all((tmp_path / "out" / p).is_file() for p in again.loc[again["status"] == "ok", "path"])


def test_damaged_archives_are_reported_and_keep_what_was_read(tmp_path, archive_dir):
    (tmp_path / "noise.tar").write_bytes(os.urandom(4096))
    (tmp_path / "noise.zip").write_bytes(b"PK\x03\x04 but no zip at all")
    whole = (archive_dir / "posters.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    forged = bytearray(write_zip(tmp_path / "forged.zip").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # bomb.png claims 1,000 bytes
        at = forged.rfind(signature)  # bomb.png is the last member
        struct.pack_into("<I", forged, at + offset, 1000)
    (tmp_path / "forged.zip").write_bytes(bytes(forged))
    sources = [{"name": n, "path": str(tmp_path / n)} for n in ("noise.tar", "noise.zip", "cut.tar.gz", "forged.zip")]
    sources = [s | {"name": s["name"].replace(".", "-")} for s in sources]
    run_download(params(tmp_path, sources), progress=False)
    manifest = manifest_of(tmp_path)
    by_source = manifest.groupby("source")["status"].apply(list).to_dict()
    assert by_source["noise-tar"] == ["not_archive"] and by_source["noise-zip"] == ["not_archive"]
    cut = by_source["cut-tar-gz"]
    assert cut[-1] == "truncated" and cut[:3] == ["ok", "ok", "ok"]  # the members before the cut are kept
    assert manifest.loc[manifest["source"] == "cut-tar-gz", "url"].iloc[-1] == str(tmp_path / "cut.tar.gz")
    forged_rows = manifest[manifest["source"] == "forged-zip"].set_index("src_member")
    assert forged_rows.loc["bomb.png", "status"] == "corrupt_member"  # zipfile stops at the declared size; CRC fails
    assert "Bad CRC-32" in forged_rows.loc["bomb.png", "error"] and forged_rows.loc["posters/p0.png", "status"] == "ok"
    assert len(list((tmp_path / "out" / "archives").iterdir())) == 1  # only the archive read to its end is indexed


class ArchiveHandler(SimpleHTTPRequestHandler):
    """Serves a folder (Content-Length and Last-Modified, as static hosts do), plus a few misbehaviours."""

    requests: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        ArchiveHandler.requests.append(self.path)
        if self.path == "/moved.tar.gz":
            self.send_response(302)
            self.send_header("Location", "/posters.tar.gz")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/to-private.tar":
            self.send_response(302)
            self.send_header("Location", "http://10.255.255.1/posters.tar")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/dropped.tar.gz":  # promises the whole archive, sends half, hangs up
            body = Path(self.directory, "posters.tar.gz").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.5)  # the client reads the first half before the connection drops
            self.close_connection = True
        elif self.path == "/drip.tar":  # a whole archive promised, then one byte at a time: each read is "in time"
            body = Path(self.directory, "posters.tar").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for byte in body[:200]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.25)
        elif self.path == "/optout.tar":
            body = Path(self.directory, "posters.tar").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Robots-Tag", "noai")
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that stops reading once it has what it needs (an unchanged archive) breaks the pipe


@pytest.fixture()
def site(archive_dir):
    ArchiveHandler.requests = []
    server = QuietServer(("127.0.0.1", 0), functools.partial(ArchiveHandler, directory=str(archive_dir)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_archives_by_url_are_streamed_safely(tmp_path, site, monkeypatch):
    sources = [
        {"name": "tgz", "path": f"{site}/posters.tar.gz"},
        {"name": "zip", "path": f"{site}/posters.zip"},  # copied to a temporary file first: its index is at its end
        {"name": "wds", "path": site + "/wds/posters-{000000..000001}.tar"},
        {"name": "moved", "path": f"{site}/moved.tar.gz"},
        {"name": "gone", "path": f"{site}/gone.tar"},
        {"name": "dropped", "path": f"{site}/dropped.tar.gz"},
        {"name": "private", "path": f"{site}/to-private.tar"},
        {"name": "optout", "path": f"{site}/optout.tar"},
    ]
    run_download(params(tmp_path, sources), progress=False)
    manifest = manifest_of(tmp_path)
    assert rows_of(manifest, "tgz") == TAR_OUTCOMES and rows_of(manifest, "moved") == TAR_OUTCOMES
    assert rows_of(manifest, "zip") == ZIP_OUTCOMES and rows_of(manifest, "wds") == SHARD_OUTCOMES
    status = manifest.groupby("source")["status"].apply(list).to_dict()
    assert status["gone"] == ["http_404"] and status["private"] == ["private_address"]
    assert status["optout"] == ["robots_optout"]
    assert status["dropped"][-1] == "truncated" and "ok" in status["dropped"]
    assert manifest.loc[manifest["source"] == "zip", "url"].iloc[0] == f"{site}/posters.zip#posters/p0.png"
    assert not (tmp_path / "out" / "tmp").exists()  # the zip's temporary copy is gone

    # Unchanged (same Last-Modified and length): no archive is read again; only the failed ones are retried.
    monkeypatch.setattr(archives, "read_archive", lambda *a, **k: pytest.fail("an unchanged archive was read again"))
    kept = [s for s in sources if s["name"] in ("tgz", "zip", "wds", "moved")]
    run_download(params(tmp_path, kept), progress=False)
    pd.testing.assert_frame_equal(
        manifest[manifest["source"].isin(["tgz", "zip", "wds", "moved"])].reset_index(drop=True), manifest_of(tmp_path)
    )


def test_private_archive_hosts_are_refused_before_connecting(tmp_path, site):
    run_download(
        params(tmp_path, [{"name": "tgz", "path": f"{site}/posters.tar.gz"}], allow_networks=[]), progress=False
    )
    assert manifest_of(tmp_path)["status"].tolist() == ["private_address"]
    assert ArchiveHandler.requests == []


def test_tls_is_verified_for_archives_by_url(tmp_path, archive_dir):
    import ssl

    from tests.helpers import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    server = QuietServer(("127.0.0.1", 0), functools.partial(ArchiveHandler, directory=str(archive_dir)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = [{"name": "tgz", "path": f"https://127.0.0.1:{server.server_address[1]}/posters.tar.gz"}]
        run_download(params(tmp_path / "strict", source), progress=False)
        assert manifest_of(tmp_path / "strict")["status"].tolist() == ["tls_error"]
        run_download(params(tmp_path / "lax", source, verify_tls=False), progress=False)
        assert rows_of(manifest_of(tmp_path / "lax"), "tgz") == TAR_OUTCOMES
    finally:
        server.shutdown()
        server.server_close()


def test_archives_in_s3(tmp_path, s3_server, s3_client, archive_dir, monkeypatch):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    bucket = s3_client.bucket_name
    s3_client.put_object(Bucket=bucket, Key="drop/posters.tar.gz", Body=(archive_dir / "posters.tar.gz").read_bytes())
    s3_client.put_object(Bucket=bucket, Key="drop/posters.zip", Body=(archive_dir / "posters.zip").read_bytes())
    for k in range(2):
        shard = (archive_dir / "wds" / f"posters-00000{k}.tar").read_bytes()
        s3_client.put_object(Bucket=bucket, Key=f"wds/posters-00000{k}.tar", Body=shard)
    sources = [
        {"name": "tgz", "path": f"s3://{bucket}/drop/posters.tar.gz"},
        {"name": "zip", "path": f"s3://{bucket}/drop/posters.zip"},
        {"name": "wds", "path": f"s3://{bucket}/wds/posters-{{000000..000001}}.tar"},
        {"name": "gone", "path": f"s3://{bucket}/drop/absent.tar"},
    ]
    storage = StorageParams(bucket=bucket, embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)})
    run_download(params(tmp_path, sources), progress=False, storage=storage)
    manifest = manifest_of(tmp_path)
    assert rows_of(manifest, "tgz") == TAR_OUTCOMES and rows_of(manifest, "zip") == ZIP_OUTCOMES
    assert rows_of(manifest, "wds") == SHARD_OUTCOMES
    assert manifest.loc[manifest["source"] == "gone", "status"].tolist() == ["http_404"]
    assert manifest.loc[manifest["source"] == "wds", "src_archive"].iloc[0] == f"s3://{bucket}/wds/posters-000000.tar"
    monkeypatch.setattr(archives, "read_archive", lambda *a, **k: pytest.fail("an unchanged archive was read again"))
    run_download(params(tmp_path, sources[:3]), progress=False, storage=storage)  # ETag and size unchanged


def test_shard_runs_read_only_their_archives(tmp_path, archive_dir, monkeypatch):
    from components.sharding import shard_of

    names = [f"posters-{k:06d}.tar" for k in range(2)]
    sources = [{"name": "wds", "path": str(archive_dir / "wds" / "posters-{000000..000001}.tar")}]
    read: list[str] = []
    original = archives.read_archive
    monkeypatch.setattr(archives, "read_archive", lambda o, a, *r: read.append(Path(a).name) or original(o, a, *r))
    for k in range(2):
        run_download(params(tmp_path, sources), shard=(k, 2), write_manifest=False, progress=False)
    expected = [n for k in range(2) for n in names if shard_of(str(archive_dir / "wds" / n), 2) == k]
    assert read == expected
    run_download(params(tmp_path, sources), progress=False)  # the manifest run: everything is indexed already
    assert read == expected and rows_of(manifest_of(tmp_path), "wds") == SHARD_OUTCOMES


def test_sidecar_captions_reach_the_caption_stage(tmp_path, archive_dir, tiny_models):
    from components.caption import run_caption
    from components.config import CaptionParams, ValidateParams
    from components.validate import run_validate
    from tests.test_caption import models_for

    run_download(params(tmp_path, [{"name": "posters", "path": str(archive_dir / "posters.zip")}]), progress=False)
    validate = ValidateParams(
        out_dir=str(tmp_path / "validate"),
        min_short_side=16,
        min_long_side=16,
        min_dpi=0,
        missing_dpi="accept",
        min_kb_per_pixel=0,
        near_duplicates={"enabled": False},
    )
    run_validate(validate, tmp_path / "out", progress=False)
    caption = CaptionParams(out_dir=str(tmp_path / "caption"), blip={"enabled": False}, template="{source}")
    run_caption(caption, models_for(tiny_models), tmp_path / "validate", progress=False)
    captions = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
    assert sorted(captions["caption"]) == ["a red poster", "a travel poster"]


def test_brace_names_member_names_and_keys():
    assert expand_braces("s-{000..002}.tar", "x") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    two = expand_braces("{a,b}/s-{8..10}.tar", "x")
    assert two == [f"{d}/s-{n}.tar" for d in "ab" for n in (8, 9, 10)]  # no padding unless the bounds have it
    assert expand_braces("plain.tar", "x") == ["plain.tar"]
    for pattern, why in [
        ("s-{9..1}.tar", "runs backwards"),
        ("s-{a..c}.tar", "not a range of whole numbers"),
        ("s-{x}.tar", "neither a range"),
        ("s-{0..{1..2}}.tar", "unbalanced or nested braces"),
        ("s-{0..3.tar", "unbalanced or nested braces"),
        ("s-{0..999999}.tar", "more than 100000 shards"),
    ]:
        with pytest.raises(ConfigError, match=rf"download.sources: 'x': .*{why}"):
            expand_braces(pattern, "x")
    assert unsafe_name("a/b.png") is None and unsafe_name("a/..b.png") is None
    assert (
        unsafe_name("a/../../b.png") and unsafe_name("/b.png") and unsafe_name("c:\\b.png") and unsafe_name("a\0.png")
    )
    assert webdataset_key("dir/0001.seg.png") == "dir/0001" and webdataset_key("0001.jpg") == "0001"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "https://example.org/list.csv"}, r"'s': https://example.org/list.csv is a URL; a source by URL must"),
        (
            {"path": "data/x.tar", "url_prefix": "https://h"},
            r"'s': url_column and url_prefix do not apply to an archive",
        ),
        ({"path": "data/x.tar", "url_column": "poster_path"}, r"url_column and url_prefix do not apply"),
        ({"path": "data/s-{3..1}.tar"}, r"download.sources: 's': .*s-\{3..1\}.tar: \{3..1\} runs backwards"),
        ({"path": "data/x.zip#"}, r"'s': data/x.zip#: an empty member pattern after #"),
    ],
)
def test_bad_archive_sources_are_config_errors(tmp_path, source, message):
    with pytest.raises(ConfigError, match=message):
        run_download(params(tmp_path, [{"name": "s"} | source]), progress=False)


def test_easel_download_stops_on_a_missing_archive_in_one_line_and_keeps_the_manifest(tmp_path, archive_dir):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["download"] = params(tmp_path, [{"name": "zip", "path": str(archive_dir / "posters.zip")}]).model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(["easel", "download"], cwd=tmp_path, check=True, capture_output=True, env=env)
    before = (tmp_path / "out" / "manifest.parquet").read_bytes()
    raw["download"]["sources"].append({"name": "shards", "path": str(tmp_path / "absent-{0..1}.tar")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    run = subprocess.run(["easel", "download"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert errors == [f"easel download: error: {tmp_path / 'absent-0.tar'}: archive not found (source 'shards')"]
    assert (tmp_path / "out" / "manifest.parquet").read_bytes() == before


def test_a_missing_local_archive_is_an_error(tmp_path):
    with pytest.raises(EaselError, match=r"absent.zip: archive not found \(source 's'\)"):
        run_download(params(tmp_path, [{"name": "s", "path": str(tmp_path / "absent.zip")}]), progress=False)


def test_an_archive_with_no_images_is_an_error_unless_expected(tmp_path):
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("README.txt", "no images here")
    with pytest.raises(EaselError, match=r"source 's' .*empty.zip\): no image members.*download.allow_empty: true"):
        run_download(params(tmp_path, [{"name": "s", "path": str(empty)}]), progress=False)
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    summary = run_download(params(tmp_path, [{"name": "s", "path": str(empty)}], allow_empty=True), progress=False)
    assert summary.rows == 0


@pytest.mark.parametrize(("host", "status"), [("2130706433", "invalid_url"), ("[::ffff:7f00:1]", "private_address")])
def test_archive_hosts_in_other_spellings_are_judged_like_image_hosts(tmp_path, host, status):
    """A numeric host is not a name to retry (`connection_error`), and an IPv6 form of 127.0.0.1 is 127.0.0.1."""
    run_download(
        params(tmp_path, [{"name": "n", "path": f"http://{host}/posters.tar"}], allow_networks=[]), progress=False
    )
    assert manifest_of(tmp_path)["status"].tolist() == [status]


# -- archives as untrusted streams (issue 23 item 3) ---------------------------------------------------


def noisy_png(seed: int, side: int = 140) -> bytes:
    """A PNG of noise (about 60 KB, incompressible): an image member whose data spans many blocks."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def test_archives_cut_or_lying_give_rows_not_crashes(tmp_path):
    """Cut inside a member's data (tar and tar.gz) or inside a header; a corrupt sidecar; two members
    with one name; a member with no name: every member read gets its own row, the archive a
    `truncated` row where it ends early, and the stage finishes."""
    members = [("a.png", noisy_png(1)), ("b.png", noisy_png(2)), ("c.png", noisy_png(3))]
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for name, data in members:
            _tar_add(tar, name, data)
    whole = (tmp_path / "whole.tar").read_bytes()
    second_header = 512 + (len(members[0][1]) + 511) // 512 * 512
    (tmp_path / "in-member.tar").write_bytes(whole[: second_header + 512 + 20_000])  # inside b.png's data
    (tmp_path / "in-header.tar").write_bytes(whole[: second_header + 100])  # inside b.png's header
    import gzip

    (tmp_path / "in-member.tar.gz").write_bytes(gzip.compress(whole)[: second_header + 30_000])

    with zipfile.ZipFile(tmp_path / "sidecar.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("p0.txt", "".join(random.Random(0).choices("abcdefghij klmnop", k=4000)))
        z.writestr("p0.png", IMAGES["p0"])
        z.writestr("p1.png", IMAGES["p1"])
    damaged = bytearray((tmp_path / "sidecar.zip").read_bytes())
    damaged[60:80] = b"\xff" * 20  # inside p0.txt's deflate data
    (tmp_path / "sidecar.zip").write_bytes(bytes(damaged))

    with tarfile.open(tmp_path / "twice.tar", "w") as tar:
        _tar_add(tar, "dup.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _tar_add(tar, "dup.png", IMAGES["p0"])
    with zipfile.ZipFile(tmp_path / "noname.zip", "w") as z:  # a damaged directory can give a member no name
        z.writestr("p0.png", IMAGES["p0"])
        z.writestr(zipfile.ZipInfo(""), IMAGES["p1"])
    names = ("in-member.tar", "in-header.tar", "in-member.tar.gz", "sidecar.zip", "twice.tar", "noname.zip")
    sources = [{"name": n.replace(".", "-"), "path": str(tmp_path / n)} for n in names]
    run_download(params(tmp_path, sources), progress=False)
    manifest = manifest_of(tmp_path)
    status = manifest.groupby("source", sort=False)["status"].apply(list).to_dict()
    assert status["in-member-tar"] == ["ok", "truncated"]
    assert status["in-header-tar"] == ["ok", "truncated"]
    assert status["in-member-tar-gz"][0] == "ok" and status["in-member-tar-gz"][-1] == "truncated"
    sidecar = manifest[manifest["source"] == "sidecar-zip"].set_index("src_member")
    assert sidecar.loc["p0.txt", "status"] == "corrupt_member" and sidecar.loc["p1.png", "status"] == "ok"
    twice = manifest[manifest["source"] == "twice-tar"]
    assert twice["status"].tolist() == ["unsafe_member", "ok"] and twice["url"].is_unique
    noname = manifest[manifest["source"] == "noname-zip"]
    assert noname["status"].tolist() == ["ok", "unsafe_member"]
    assert noname["error"].iloc[1] == "member '' refused: an empty name (a damaged directory, mostly)"


def test_archive_streams_have_a_deadline_and_a_size_cap(tmp_path, site, archive_dir):
    """A URL that drips a byte at a time (each read within read_timeout_s) stops at
    archive_timeout_s; a remote zip larger than max_archive_bytes is not copied past it; a local
    archive has the same deadline."""
    sources = [{"name": "drip", "path": f"{site}/drip.tar"}, {"name": "zip", "path": f"{site}/posters.zip"}]
    # The drip would send 200 bytes over 50 s and end (truncated); the deadline ends it first.
    run_download(
        params(tmp_path, sources, read_timeout_s=5, archive_timeout_s=1.5, max_archive_bytes=2_000), progress=False
    )
    manifest = manifest_of(tmp_path)
    rows = manifest.set_index("source")
    assert rows.loc["drip", "status"] == "timeout" and "download.archive_timeout_s" in rows.loc["drip", "error"]
    assert rows.loc["zip", "status"] == "too_large" and "download.max_archive_bytes" in rows.loc["zip", "error"]
    assert not (tmp_path / "out" / "tmp").exists()
    local = [{"name": "local", "path": str(archive_dir / "posters.tar")}]
    run_download(params(tmp_path / "l", local, archive_timeout_s=1e-9), progress=False)
    assert manifest_of(tmp_path / "l")["status"].tolist()[-1] == "timeout"


# -- any archive, however damaged: rows, never an exception ------------------------------------------------

MEMBER_NAMES = (
    "a.png", "b.jpg", "sub/c.png", "a.txt", "notes.md", "000001.png", "000001.txt", "000001.seg.png",
    "../up.png", "/abs.png", "C:/drive.png", "..\\win.png", "sub/../../deep.png",
)  # fmt: skip
MEMBER_KINDS = ("file", "file", "file", "symlink", "hardlink", "device", "dir")


def build_archive(path: Path, fmt: str, members: list[tuple[str, str, bool]]) -> Path:
    """A zip, tar, tar.gz or WebDataset shard (a tar of keyed samples) holding `members`:
    (name, kind, whether the bytes are an image)."""
    import warnings

    if fmt == "zip":
        with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            warnings.simplefilter("ignore")  # "Duplicate name": what this test is about
            for name, kind, image in members:
                info = zipfile.ZipInfo(name + ("/" if kind == "dir" else ""))
                mode = {"symlink": 0o120777, "device": 0o020644, "dir": 0o040755}.get(kind, 0o100644)
                info.external_attr = mode << 16
                z.writestr(info, IMAGES["p0"] if image else b"not an image")
        return path
    with tarfile.open(path, "w:gz" if fmt == "tar.gz" else "w") as tar:
        for name, kind, image in members:
            info = tarfile.TarInfo(name)
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "device": tarfile.CHRTYPE,
                "dir": tarfile.DIRTYPE,
            }.get(kind, tarfile.REGTYPE)
            data = IMAGES["p0"] if image else b"not an image"
            info.size, info.linkname = (len(data), "") if kind == "file" else (0, "/etc/passwd")
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return path


def rows_expected(members: list[tuple[str, str, bool]]) -> int:
    """Refused members (a hostile name, a link, a device) and image files each give one row."""
    count = 0
    for name, kind, _image in members:
        refused = unsafe_name(name) is not None or kind in ("symlink", "hardlink", "device")
        count += refused or (kind == "file" and name.rsplit(".", 1)[-1] in ("png", "jpg"))
    return count


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    members=st.lists(
        st.tuples(st.sampled_from(MEMBER_NAMES), st.sampled_from(MEMBER_KINDS), st.booleans()), min_size=1, max_size=8
    ),
    fmt=st.sampled_from(["zip", "tar", "tar.gz", "wds"]),
    damage=st.one_of(
        st.none(),
        st.tuples(st.just("cut"), st.floats(0.0, 1.0)),
        st.tuples(st.just("flip"), st.floats(0.0, 1.0), st.integers(1, 600)),
    ),
)
def test_property_any_archive_gives_one_row_per_member_and_never_an_exception(tmp_path_factory, members, fmt, damage):
    """Random members (hostile names, links, devices, repeated names) in any format, cut or with bytes
    overwritten anywhere: no exception escapes, nothing is written outside out_dir, every row's URL is
    its own, and an undamaged archive has exactly one row per image or refused member."""
    from components.download.fetch import FetchSettings

    work = tmp_path_factory.mktemp("any-archive")
    suffix = {"zip": "zip", "tar": "tar", "tar.gz": "tar.gz", "wds": "tar"}[fmt]
    if fmt == "wds":  # WebDataset names: a sample key, then the extension
        members = [(f"{i // 2:06d}.{n.rsplit('.', 1)[-1]}", k, img) for i, (n, k, img) in enumerate(members)]
    if fmt == "zip":  # a zip has no hard links
        members = [(n, "file" if k == "hardlink" else k, img) for n, k, img in members]
    path = build_archive(work / f"shard.{suffix}", fmt, members)
    data = bytearray(path.read_bytes())
    if damage and damage[0] == "cut":
        data = data[: int(len(data) * damage[1])]
    elif damage:
        at = int(len(data) * damage[1])
        data[at : at + damage[2]] = random.Random(at).randbytes(len(data[at : at + damage[2]]))
    path.write_bytes(bytes(data))
    before = {p for p in work.rglob("*")}
    out = work / "out"
    rows = archives.ArchiveReader(out, FetchSettings(max_bytes=MAX_BYTES)).read_one(str(path), "s")
    assert {p for p in work.rglob("*")} - before <= {out, *out.rglob("*")}
    assert len(set(rows.urls)) == len(rows.urls) == len(rows.records) == len(rows.extras)
    for record in rows.records:
        assert record["status"] != "ok" or (out / "images") in (out / record["path"]).resolve().parents
    if damage is None:
        assert len(rows.urls) == rows_expected(members) and str(path) not in rows.urls, rows.records
