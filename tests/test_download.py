"""The download stage against real HTTP servers on 127.0.0.1 that misbehave in every usual way."""

import gzip
import itertools
import json
from pathlib import Path

import pandas as pd
import pytest

from components.config import DownloadParams
from components.download import run_download
from components.download.fetch import TRANSIENT_STATUSES, parse_retry_after, sniff_image_type
from components.download.sources import join_url, read_source
from components.plumbing.errors import EaselError
from tests.http_fixtures import RED, MisbehavingServer


@pytest.fixture()
def server():
    with MisbehavingServer() as srv:
        yield srv


def params_for(tmp_path, urls, allow=("127.0.0.0/8",), **kw) -> DownloadParams:
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv = (tmp_path / "urls.csv").resolve()
    pd.DataFrame({"url": urls, "title": [f"t{i}" for i in range(len(urls))]}).to_csv(csv, index=False)
    base = {
        "sources": [{"name": "test", "path": str(csv)}],
        "out_dir": str((tmp_path / "out").resolve()),
        "allow_networks": list(allow),
        "read_timeout_s": 1.0,
        "total_timeout_s": 4.0,
        "connect_timeout_s": 1.0,
        "max_bytes": 1_000_000,
        "retries": 1,
    }
    return DownloadParams(**(base | kw))


def outcomes(tmp_path) -> dict[str, str]:
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    return {url.rsplit("/", 1)[-1]: status for url, status in zip(manifest["url"], manifest["status"], strict=True)}


def stray_files(tmp_path) -> list[str]:
    return [
        p.name for p in (tmp_path / "out").rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix == ".part")
    ]


def test_every_misbehaviour_ends_with_its_outcome(server, tmp_path):
    names = [
        "red.png",
        "blue.png",
        "html.jpg",
        "gone.png",
        "error.png",
        "hop1",
        "loop-a",
        "to-private",
        "busy.png",
        "optout.png",
        "huge.png",
        "endless.png",
        "truncated.png",
        "stall.png",
        "drip.png",
    ]
    params = params_for(tmp_path, [f"{server.url}/{n}" for n in names], max_redirects=3)
    summary = run_download(params, tmp_path / "metrics.json", progress=False)
    got = outcomes(tmp_path)
    assert got == {
        "red.png": "ok",
        "blue.png": "ok",  # served as text/plain, but the bytes are a PNG
        "html.jpg": "not_image",  # served as image/jpeg, but the bytes are HTML
        "gone.png": "http_404",
        "error.png": "http_500",
        "hop1": "ok",  # two redirects, followed
        "loop-a": "too_many_redirects",
        "to-private": "private_address",
        "busy.png": "ok",  # 429 + Retry-After: 1, then served on the retry
        "optout.png": "robots_optout",
        "huge.png": "too_large",  # refused on Content-Length, before reading
        "endless.png": "too_large",  # chunked with no length: cut off while streaming
        "truncated.png": "truncated",
        "stall.png": "timeout",  # silent longer than the read timeout
        "drip.png": "timeout",  # never silent, but slower than the total timeout
    }
    assert summary.unique_images == 2  # red (also behind the redirect chain) and blue
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["outcomes"]["ok"] == 4 and metrics["rows"] == len(names)
    assert stray_files(tmp_path) == []
    assert all(ua.startswith("Easel/") for ua in server.server.RequestHandlerClass.user_agents)


def test_manifest_keeps_every_row_and_errors_have_messages(server, tmp_path):
    params = params_for(tmp_path, [f"{server.url}/red.png", "", f"{server.url}/gone.png", "ftp://x/y.png"])
    run_download(params, progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert list(manifest["row"]) == [0, 1, 2, 3]
    assert list(manifest["status"]) == ["ok", "missing_url", "http_404", "invalid_url"]
    assert list(manifest["src_title"]) == ["t0", "t1", "t2", "t3"]  # extra columns travel
    assert manifest.loc[manifest["status"] != "ok", "error"].notna().all()


def test_private_addresses_refused_unless_allowed(server, tmp_path):
    port = server.server.server_address[1]
    urls = [f"{server.url}/red.png", f"http://localhost:{port}/red.png"]
    run_download(params_for(tmp_path, urls, allow=()), progress=False)
    assert set(outcomes(tmp_path).values()) == {"private_address"}
    assert server.server.RequestHandlerClass.counters == {}  # refused before connecting


def test_same_image_at_two_urls_is_stored_once(server, tmp_path):
    urls = [f"{server.url}/dup/a.png", f"{server.url}/dup/b.png", f"{server.url}/dup/a.png"]
    run_download(params_for(tmp_path, urls), progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest["sha256"].nunique() == 1 and len(manifest) == 3
    stored = [p for p in (tmp_path / "out" / "images").rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].read_bytes() == RED
    assert stored[0].name == f"{manifest['sha256'][0]}.png"  # named by content, not by URL
    assert server.server.RequestHandlerClass.counters["/dup/a.png"] == 1  # a repeated URL is fetched once


def test_rerun_fetches_only_what_is_missing_and_gives_the_same_manifest(server, tmp_path):
    urls = [f"{server.url}/red.png", f"{server.url}/gone.png", f"{server.url}/blue.png"]
    params = params_for(tmp_path, urls)
    run_download(params, progress=False)
    first = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    stored = next((tmp_path / "out" / "images").rglob("*.png"))
    stored.unlink()  # lose one file: only that URL is fetched again
    counts = dict(server.server.RequestHandlerClass.counters)
    summary = run_download(params, progress=False)
    assert summary.fetched_now == 1
    fetched_again = {k: v - counts.get(k, 0) for k, v in server.server.RequestHandlerClass.counters.items()}
    assert sum(fetched_again.values()) == 1
    pd.testing.assert_frame_equal(first, pd.read_parquet(tmp_path / "out" / "manifest.parquet"))


def test_torn_journal_line_is_ignored(server, tmp_path):
    params = params_for(tmp_path, [f"{server.url}/red.png"])
    run_download(params, progress=False)
    part = next((tmp_path / "out" / "journal").glob("*.jsonl"))
    with open(part, "a") as fh:
        fh.write('{"url": "http://half-writ')  # what kill -9 mid-write leaves
    summary = run_download(params, progress=False)
    assert summary.statuses == {"ok": 1} and summary.fetched_now == 0


def test_source_formats_and_prefix(tmp_path):
    rows = [
        {"poster_path": "/a.jpg", "name": "A"},
        {"poster_path": "https://cdn.example/b.jpg", "name": "B"},
        {"poster_path": "", "name": "C"},
    ]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "s.csv", index=False)
    frame.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    frame.to_json(tmp_path / "s.json", orient="records")
    frame.to_parquet(tmp_path / "s.parquet")
    with gzip.open(tmp_path / "s.jsonl.gz", "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    prefix = "https://www.themoviedb.org/t/p/w600_and_h900_bestv2"
    for name in ("s.csv", "s.tsv", "s.json", "s.parquet", "s.jsonl.gz"):
        from components.config import SourceParams

        table = read_source(
            SourceParams(name="kaggle", path=str(tmp_path / name), url_column="poster_path", url_prefix=prefix)
        )
        assert table["url"].tolist()[:2] == [f"{prefix}/a.jpg", "https://cdn.example/b.jpg"], name
        assert pd.isna(table["url"].tolist()[2]), name
        assert table["src_name"].tolist() == ["A", "B", "C"], name


def test_missing_url_column_names_the_columns(tmp_path):
    from components.config import SourceParams

    (tmp_path / "s.csv").write_text("link,title\nhttp://x/a.png,A\n")
    with pytest.raises(EaselError, match=r"s\.csv: no column 'url' .*columns are: link, title"):
        read_source(SourceParams(name="s", path=str(tmp_path / "s.csv")))


def test_unreadable_url_list(tmp_path):
    from components.config import SourceParams

    (tmp_path / "s.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(EaselError, match=r"s\.parquet: cannot be read as parquet"):
        read_source(SourceParams(name="s", path=str(tmp_path / "s.parquet")))
    with pytest.raises(EaselError, match="URL list not found"):
        read_source(SourceParams(name="s", path=str(tmp_path / "absent.csv")))
    with pytest.raises(EaselError, match="unknown URL list format"):
        read_source(SourceParams(name="s", path=str(tmp_path / "list.xlsx")))


def test_helpers():
    assert join_url("/x.jpg", "http://h/p/") == "http://h/p/x.jpg"
    assert join_url("  ", "http://h") is None
    assert sniff_image_type(RED[:16]) == "png"
    assert sniff_image_type(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff_image_type(b"<html>") is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0) == 0.0
    assert parse_retry_after("soon") is None


def test_worker_processes_share_the_urls(server, tmp_path, monkeypatch):
    from components.download import stage

    monkeypatch.setattr(stage, "MIN_URLS_PER_WORKER", 10)
    urls = [f"{server.url}/n/{k}.png" for k in range(60)]
    summary = run_download(params_for(tmp_path, urls, workers=2, concurrency=8), progress=False)
    assert summary.statuses == {"ok": 60} and summary.unique_images == 60
    assert len(list((tmp_path / "out" / "journal").glob("*.jsonl"))) == 2  # one journal part per process
    assert stray_files(tmp_path) == []


def test_shards_then_manifest(server, tmp_path):
    urls = [f"{server.url}/n/{k}.png" for k in range(30)]
    params = params_for(tmp_path, urls)
    with pytest.raises(EaselError, match="have not been fetched by any shard yet"):
        run_download(params, shard=(0, 3), progress=False)  # writing a manifest before all shards ran
    fetched = [run_download(params, shard=(k, 3), write_manifest=False, progress=False).fetched_now for k in (1, 2)]
    before = dict(server.server.RequestHandlerClass.counters)
    final = run_download(params, progress=False)  # every shard ran: nothing left to fetch
    assert final.fetched_now == 0 and server.server.RequestHandlerClass.counters == before
    from components.sharding import share

    assert final.statuses == {"ok": 30}
    assert fetched == [10, 10]  # each shard fetched its own share, a third of the URLs
    assert [len(share(urls, (k, 3), key=str)) for k in (1, 2)] == fetched


def test_kill_9_then_resume_ends_with_the_same_manifest(server, tmp_path):
    import os
    import signal
    import subprocess
    import time

    import yaml

    urls = [f"{server.url}/n/{k}.png" for k in range(150)]

    def project(name):
        folder = tmp_path / name
        folder.mkdir()
        params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        params["download"] = params_for(folder, urls, concurrency=2).model_dump()
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        return folder

    straight, killed = project("straight"), project("killed")
    subprocess.run(["easel", "download"], cwd=straight, check=True, capture_output=True)
    scratch = tmp_path / "tmp"  # the killed run's scratch (its URL index) stays behind here
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(
        ["easel", "download"], cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = killed / "out" / "journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once some, not all, URLs are done
        lines = sum(p.read_text().count("\n") for p in journal.glob("*.jsonl")) if journal.is_dir() else 0
        if lines >= 20:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "out" / "manifest.parquet").exists()
    done_before = sum(p.read_text().count("\n") for p in journal.glob("*.jsonl"))
    assert 20 <= done_before < 150
    assert [p.name.rsplit("-", 1)[0] for p in scratch.iterdir() if p.is_dir()] == ["easel-download"]
    resumed = subprocess.run(["easel", "download"], cwd=killed, env=env, check=True, capture_output=True, text=True)
    assert f"fetched {150 - done_before} now" in resumed.stdout  # only what was missing
    assert list(scratch.iterdir()) == []  # the resumed run removed the killed run's scratch, then its own
    a = pd.read_parquet(straight / "out" / "manifest.parquet")
    b = pd.read_parquet(killed / "out" / "manifest.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert stray_files(killed) == []


def test_local_folder_and_s3_prefix_sources(tmp_path, s3_server, s3_client, monkeypatch):
    from components.config import StorageParams

    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    folder = tmp_path / "posters"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(RED)
    (folder / "sub" / "b.PNG").write_bytes(RED + b"#b")
    (folder / "notes.txt").write_text("not an image source file")  # skipped by suffix
    (folder / "fake.jpg").write_text("<html>")  # an image suffix, but not an image
    bucket = s3_client.bucket_name
    s3_client.put_object(Bucket=bucket, Key="drop/c.png", Body=RED + b"#c")
    s3_client.put_object(Bucket=bucket, Key="drop/readme.md", Body=b"#")
    s3_client.put_object(Bucket=bucket, Key="elsewhere/d.png", Body=RED + b"#d")
    params = DownloadParams(
        sources=[{"name": "folder", "path": str(folder)}, {"name": "bucket", "path": f"s3://{bucket}/drop/"}],
        out_dir=str(tmp_path / "out"),
    )
    storage = StorageParams(bucket=bucket, embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)})
    run_download(params, progress=False, storage=storage)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    got = dict(zip(manifest["url"].str.rsplit("/", n=1).str[-1], manifest["status"], strict=True))
    assert got == {"a.png": "ok", "fake.jpg": "not_image", "b.PNG": "ok", "c.png": "ok"}
    assert manifest.loc[manifest["source"] == "folder", "src_file"].tolist() == ["a.png", "fake.jpg", "sub/b.PNG"]
    assert manifest["sha256"].dropna().nunique() == 3


def test_tls_is_verified_by_default(tmp_path):
    """A self-signed HTTPS server on 127.0.0.1: refused unless verify_tls is switched off."""
    import ssl
    import threading
    from http.server import ThreadingHTTPServer

    from tests.helpers import self_signed_cert
    from tests.http_fixtures import Handler

    cert, key = self_signed_cert(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/red.png"
        run_download(params_for(tmp_path / "strict", [url], retries=0), progress=False)
        assert outcomes(tmp_path / "strict") == {"red.png": "tls_error"}
        run_download(params_for(tmp_path / "lax", [url], verify_tls=False), progress=False)
        assert outcomes(tmp_path / "lax") == {"red.png": "ok"}
    finally:
        server.shutdown()


def test_per_host_rate_spaces_requests(server, tmp_path):
    """Politeness, not speed: no two requests to one host closer than 1/rate (a lower bound only)."""
    urls = [f"{server.url}/n/{k}.png" for k in range(8)]
    run_download(params_for(tmp_path, urls, per_host_rate=10.0, concurrency=8), progress=False)
    arrivals = sorted(server.server.RequestHandlerClass.arrivals)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 8 and min(gaps) >= 0.09


def test_a_run_removes_what_killed_runs_half_wrote_and_spares_live_writers(server, tmp_path):
    """A run (a shard, say) starting up removes the temp files that killed runs left in the folder
    DVC keeps (an image, the manifest), not those another run is still writing, nor another
    host's recent ones."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from components.plumbing.fsutil import writer_tag

    out, host = tmp_path / "out", socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "images" / "ab").mkdir(parents=True)
    left = {
        "killed image": out / "images" / "ab" / f".{dead.pid}@{host}.a8c1b2d3.part",
        "killed manifest": out / f".manifest.parquet.{dead.pid}@{host}.q1w2e3r4.tmp",
        "old, of another host": out / ".manifest.parquet.77@elsewhere.z9y8x7w6.tmp",
    }
    kept = {
        "live image": out / "images" / "ab" / f".{writer_tag()}.k3j2h1g0.part",
        "live manifest": out / f".manifest.parquet.{writer_tag()}.m4n5b6v7.tmp",
        "recent, of another host": out / ".manifest.parquet.78@elsewhere.p0o9i8u7.tmp",
        "the user's dotfile": out / ".keep",
    }
    for path in [*left.values(), *kept.values()]:
        path.write_bytes(b"half written")
    hour_ago = time.time() - 2 * 3600
    os.utime(left["old, of another host"], (hour_ago, hour_ago))

    run_download(params_for(tmp_path, [f"{server.url}/red.png"]), progress=False)
    assert [name for name, path in left.items() if path.exists()] == []
    assert [name for name, path in kept.items() if not path.exists()] == []


def test_timeouts_name_the_wait_that_ran_out(server, tmp_path):
    params = params_for(tmp_path, [f"{server.url}/stall.png", f"{server.url}/drip.png"], retries=0)
    run_download(params, progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("url")
    assert manifest.loc[f"{server.url}/stall.png", "error"] == "no data for 1 s while reading the response"
    assert manifest.loc[f"{server.url}/drip.png", "error"] == "no complete response in 4 s"


@pytest.mark.parametrize("host", ["2852039166", "0251.0376.0251.0376", "0xa9.254.169.254", "169.254.43518"])
def test_non_canonical_ipv4_hosts_are_invalid_and_never_retried(tmp_path, host):
    params = params_for(tmp_path, [f"http://{host}/latest/meta-data"], allow=())
    run_download(params, progress=False)
    row = pd.read_parquet(tmp_path / "out" / "manifest.parquet").iloc[0]
    assert row["status"] == "invalid_url" and row["status"] not in TRANSIENT_STATUSES  # final: a resume skips it
    assert "not a canonical IPv4 address" in row["error"]


@pytest.mark.parametrize("shape", ["header-only csv", "header-only csv.gz", "empty folder", "no urls"])
def test_an_empty_source_is_an_error_and_replaces_nothing(server, tmp_path, shape):
    params = params_for(tmp_path, [f"{server.url}/red.png"])
    run_download(params, tmp_path / "metrics.json", progress=False)
    before = {p: p.read_bytes() for p in [*(tmp_path / "out").rglob("*"), tmp_path / "metrics.json"] if p.is_file()}
    source = tmp_path / "empty"
    if shape == "empty folder":
        source.mkdir()
    elif shape == "no urls":
        source = tmp_path / "blank.csv"
        source.write_text("url,title\n,a\n,b\n")
    elif shape.endswith(".gz"):
        source = tmp_path / "empty.csv.gz"
        source.write_bytes(gzip.compress(b"url,title\n"))
    else:
        source = tmp_path / "empty.csv"
        source.write_text("url,title\n")
    params = params.model_copy(update={"sources": [params.sources[0].model_copy(update={"path": str(source)})]})
    with pytest.raises(EaselError, match=r"source 'test' .*: no (rows|URL in any).*download.allow_empty: true"):
        run_download(params, tmp_path / "metrics.json", progress=False)
    after = {p: p.read_bytes() for p in [*(tmp_path / "out").rglob("*"), tmp_path / "metrics.json"] if p.is_file()}
    assert after == before  # the last good manifest and metrics are still there
    allowed = params.model_copy(update={"allow_empty": True})
    assert run_download(allowed, progress=False).rows == (2 if shape == "no urls" else 0)  # when it is expected


# Every spelling of a host that leads to a private, loopback or link-local address, and what it leads to.
# The IPv6 forms embed an IPv4 address (mapped, compatible, NAT64, SIIT, 6to4, Teredo): they are judged by it.
REFUSED_HOSTS = [
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "private"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("[::1]", "IPv6 loopback"),
    ("[fe80::1]", "IPv6 link-local"),
    ("[fd00::1]", "IPv6 unique local"),
    ("[::ffff:127.0.0.1]", "IPv4-mapped"),
    ("[::ffff:7f00:1]", "IPv4-mapped, hex"),
    ("[::7f00:1]", "IPv4-compatible"),
    ("[::a9fe:a9fe]", "IPv4-compatible, metadata"),
    ("[::ffff:0:7f00:1]", "SIIT IPv4-translated"),
    ("[64:ff9b::7f00:1]", "NAT64 well-known prefix"),
    ("[64:ff9b::a9fe:a9fe]", "NAT64, metadata"),
    ("[64:ff9b:1::a00:1]", "NAT64 local-use prefix"),
    ("[2002:7f00:1::1]", "6to4 of 127.0.0.1"),
    ("[2002:a9fe:a9fe::]", "6to4 of the metadata address"),
    ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "Teredo, client 127.0.0.1"),
]
INVALID_HOSTS = ["2130706433", "0x7f000001", "017700000001", "127.1", "0x7f.1", "2852039166", "0251.0376.0251.0376"]
ACCEPTED_HOSTS = ["8.8.8.8", "[2606:4700:4700::1111]", "[64:ff9b::808:808]", "[2002:808:808::1]", "[::ffff:8.8.8.8]"]


@pytest.mark.parametrize(("host", "form"), REFUSED_HOSTS)
def test_every_spelling_of_a_private_address_is_refused_before_connecting(host, form):
    from components.download.fetch import refused_host

    status, reason = refused_host(f"http://{host}/latest/meta-data", [])
    assert status == "private_address", form
    assert "not allowed" in reason


@pytest.mark.parametrize("host", INVALID_HOSTS)
def test_numeric_hosts_that_are_not_dotted_quads_are_invalid(host):
    from components.download.fetch import refused_host

    assert refused_host(f"http://{host}/x.png", [])[0] == "invalid_url"


@pytest.mark.parametrize("host", ACCEPTED_HOSTS)
def test_public_addresses_in_any_form_pass(host):
    from components.download.fetch import refused_host

    assert refused_host(f"http://{host}/x.png", []) is None


def test_an_allowed_network_allows_its_embedded_forms():
    import ipaddress

    from components.download.fetch import refused_host

    loopback = [ipaddress.ip_network("127.0.0.0/8")]
    assert refused_host("http://[::ffff:127.0.0.1]:8765/x.png", loopback) is None
    assert refused_host("http://[64:ff9b::7f00:1]/x.png", loopback) is None
    assert refused_host("http://[64:ff9b::a9fe:a9fe]/x.png", loopback)[0] == "private_address"


def test_lists_read_in_chunks_give_the_manifest_of_lists_read_whole(server, tmp_path, monkeypatch):
    """The stage reads its lists a chunk at a time (download.sources.CHUNK_ROWS; memory stays flat).
    With chunks of 4 rows, lists of 11 to 13 rows in every format, each with its own extra columns,
    repeated URLs and empty cells give the manifest that one chunk per list gives, row for row."""
    from components.download import sources

    urls = [f"{server.url}/n/{k}.png" for k in range(9)]
    lists = {
        "a.csv": pd.DataFrame({"url": [*urls, urls[0], "", urls[3]], "title": [f"t{i}" for i in range(12)]}),
        "b.jsonl": pd.DataFrame({"url": [*urls[4:], None, *urls[:7]], "caption": [f"c{i}" for i in range(13)]}),
        "c.parquet": pd.DataFrame({"url": urls[::-1] + urls[:2], "title": list("abcdefghijk"), "year": ["1"] * 11}),
        "d.json": pd.DataFrame({"url": urls[2:] + urls[:4], "kind": ["poster"] * 11}),
    }
    for name, frame in lists.items():
        path = tmp_path / "lists" / name
        path.parent.mkdir(exist_ok=True)
        if name.endswith(".csv"):
            frame.to_csv(path, index=False)
        elif name.endswith(".jsonl"):
            frame.to_json(path, orient="records", lines=True)
        elif name.endswith(".json"):
            frame.to_json(path, orient="records")
        else:
            frame.to_parquet(path)
    specs = [{"name": n.split(".")[0], "path": str(tmp_path / "lists" / n)} for n in lists]

    def manifest(folder: str, chunk_rows: int) -> pd.DataFrame:
        monkeypatch.setattr(sources, "CHUNK_ROWS", chunk_rows)
        params = params_for(tmp_path / folder, urls, sources=specs)
        summary = run_download(params, progress=False)
        assert summary.urls == 9 and summary.unique_images == 9
        return pd.read_parquet(Path(params.out_dir) / "manifest.parquet")

    whole, chunked = manifest("whole", 50_000), manifest("chunked", 4)
    pd.testing.assert_frame_equal(chunked, whole)
    assert len(whole) == 12 + 13 + 11 + 11
    assert whole.groupby("source")["row"].apply(list).to_dict() == {
        "a": list(range(12)), "b": list(range(13)), "c": list(range(11)), "d": list(range(11))
    }  # fmt: skip
    assert {"src_title", "src_caption", "src_year", "src_kind"} <= set(whole.columns)
    assert whole["status"].value_counts().to_dict() == {"ok": 45, "missing_url": 2}
    assert whole["src_year"].notna().sum() == 11  # a column only one list has is empty elsewhere
