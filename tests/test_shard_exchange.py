"""The shard exchange (components.shard_exchange) against the real S3 server: what a shard hands back
reaches the project's caches and nothing else does; a listing cannot write outside the folder; an
object that does not match its hash is refused; the run's prefix is gone after it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from components.plumbing.errors import EaselError
from components.plumbing.fsutil import read_archive_index
from components.shard_exchange import (
    ARCHIVE_DIR,
    HANDED_IMAGES,
    close_exchange,
    collect_shard_results,
    open_exchange,
    publish_shard_results,
    publish_stage_inputs,
    shard_folder,
)
from components.storage import ensure_bucket, make_client
from tests.conftest import REPO


@pytest.fixture()
def project(tmp_path, s3_server) -> Path:
    """A project folder with the repository's params, pointed at the test server and a new bucket."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["storage"]["embedded"] = {"port": s3_server.port, "data_dir": str(s3_server.data_dir)}
    params["storage"]["bucket"] = "exch-" + os.urandom(4).hex()
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ensure_bucket(make_client(s3_server.settings()), params["storage"]["bucket"])
    return folder


def put_listing(client, exchange, stage: str, name: str, files: dict[str, str]) -> None:
    body = json.dumps({"files": files}).encode()
    client.put_object(Bucket=exchange.bucket, Key=exchange.listing(stage, name), Body=body)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_what_a_shard_writes_in_its_caches_reaches_the_project_and_nothing_else(project, s3_server, tmp_path):
    exchange = open_exchange(project)
    client = make_client(s3_server.settings())
    params = (project / "params.yaml").read_bytes()
    client.put_object(Bucket=exchange.bucket, Key=exchange.objects(sha(params)), Body=params)
    put_listing(client, exchange, "download", "inputs", {"params.yaml": sha(params)})

    os.environ["EASEL_SHARD_DIR"] = str(tmp_path / "shards")
    try:
        with shard_folder(exchange, "download", 0, 1) as folder:
            assert folder.parent == tmp_path / "shards" and (folder / "params.yaml").read_bytes() == params
            # What `easel download --shard` writes: images and a journal part (its caches), and
            # anything else, which is not the shard's to hand back (the DVC stage writes outputs).
            (folder / "data/download/images/ab").mkdir(parents=True)
            (folder / "data/download/images/ab/ab12.png").write_bytes(b"png bytes")
            (folder / "data/download/journal").mkdir()
            (folder / "data/download/journal/part-0.jsonl").write_text('{"url": "u"}\n')
            (folder / "data/download/manifest.parquet").write_bytes(b"not handed back")
            assert publish_shard_results(exchange, "download", 0, 1, folder) == 2
        assert not folder.exists()
    finally:
        del os.environ["EASEL_SHARD_DIR"]

    assert collect_shard_results(exchange, "download", 1, project) == 2
    assert (project / "data/download/images/ab/ab12.png").read_bytes() == b"png bytes"
    assert (project / "data/download/journal/part-0.jsonl").read_text() == '{"url": "u"}\n'
    assert not (project / "data/download/manifest.parquet").exists()
    assert collect_shard_results(exchange, "download", 1, project) == 0  # already there: nothing fetched again

    # A shard that never handed anything back stops the merge, named.
    with pytest.raises(EaselError, match=r"shard-0-of-2.json: missing \(download shard 0/2 handed nothing back\)"):
        collect_shard_results(exchange, "download", 2, project)

    assert close_exchange(exchange) == 4  # params, the shard's one archive of two cache files, two listings
    assert client.list_objects_v2(Bucket=exchange.bucket, Prefix=exchange.prefix)["KeyCount"] == 0


def test_a_listing_cannot_write_outside_the_folder_nor_pass_off_other_bytes(project, s3_server):
    exchange = open_exchange(project)
    client = make_client(s3_server.settings())
    data = b"cache entry"
    client.put_object(Bucket=exchange.bucket, Key=exchange.objects(sha(data)), Body=data)

    put_listing(client, exchange, "validate", "shard-0-of-1", {"../escaped.json": sha(data)})
    with pytest.raises(EaselError, match=r"path '\.\./escaped\.json' is not inside the folder; refused"):
        collect_shard_results(exchange, "validate", 1, project)
    assert not (project.parent / "escaped.json").exists()

    # An object whose bytes are not the ones its name promises (a corrupted or replaced object).
    client.put_object(Bucket=exchange.bucket, Key=exchange.objects("0" * 64), Body=data)
    put_listing(client, exchange, "validate", "shard-0-of-1", {".easel/cache/validate/ab/x.json": "0" * 64})
    with pytest.raises(EaselError, match=r"the object for \.easel/cache/validate/ab/x\.json does not match its sha256"):
        collect_shard_results(exchange, "validate", 1, project)
    assert not (project / ".easel/cache/validate/ab/x.json").exists()

    # An object the listing names that the exchange does not hold.
    put_listing(client, exchange, "validate", "shard-0-of-1", {".easel/cache/validate/ab/y.json": "1" * 64})
    with pytest.raises(EaselError, match=r"the object for \.easel/cache/validate/ab/y\.json is missing"):
        collect_shard_results(exchange, "validate", 1, project)

    # A folder on the way that is a link out of the project (the tiny models are one) is not written through.
    (project / "linked").symlink_to(project.parent)
    put_listing(client, exchange, "validate", "shard-0-of-1", {"linked/escaped.json": sha(data)})
    with pytest.raises(EaselError, match=r"path 'linked/escaped\.json' is not inside the folder; refused"):
        collect_shard_results(exchange, "validate", 1, project)
    assert not (project.parent / "escaped.json").exists()
    assert list(project.rglob("*.tmp")) == []  # no temp file left by a refused object
    close_exchange(exchange)


def test_a_shard_archive_is_checked_like_single_objects(project, s3_server, tmp_path):
    """A shard's results come packed in one tar object. The archive must match its sha256, and each
    member its listing names must be a regular file with the listed sha256; a listed file missing
    from the archive stops the merge too. Nothing is written from a refused archive, and a member
    the listing does not name is never written."""
    exchange = open_exchange(project)
    client = make_client(s3_server.settings())
    good, other = b"cache entry", b"other bytes"
    listed = {".easel/cache/validate/ab/x.json": sha(good)}

    def archive(*members: tuple[str, bytes | None]) -> str:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                if data is None:  # a link out of the project
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        body = buffer.getvalue()
        client.put_object(Bucket=exchange.bucket, Key=exchange.objects(sha(body)), Body=body)
        return sha(body)

    def collect(files: dict[str, str], packed: str) -> None:
        body = json.dumps({"files": files, "archives": [packed]}).encode()
        client.put_object(Bucket=exchange.bucket, Key=exchange.listing("validate", "shard-0-of-1"), Body=body)
        collect_shard_results(exchange, "validate", 1, project)

    cases = [
        (listed, archive((".easel/cache/validate/ab/x.json", other)), "does not match its sha256"),
        (listed, archive((".easel/cache/validate/ab/x.json", None)), "not a file its listing"),
        (listed | {".easel/cache/validate/cd/y.json": sha(other)}, archive((".easel/cache/validate/ab/x.json", good)),
         "the archives lack"),
        (listed, "0" * 64, "archive object of validate shard 0/1 results is missing"),
    ]  # fmt: skip
    client.put_object(Bucket=exchange.bucket, Key=exchange.objects("1" * 64), Body=b"not the archive")
    cases.append((listed, "1" * 64, "archive object of validate shard 0/1 results does not match its sha256"))
    for files, packed, message in cases:
        with pytest.raises(EaselError, match=message):
            collect(files, packed)
    assert (project / "params.yaml").read_bytes() != b"evil"
    assert list(project.rglob("*.tmp")) == []
    assert not (project / ".easel/cache/validate/cd/y.json").exists()

    # The good archive is written, less what its listing does not name; a second merge writes nothing again.
    collect(listed, archive((".easel/cache/validate/ab/x.json", good), ("params.yaml", b"evil")))
    assert (project / ".easel/cache/validate/ab/x.json").read_bytes() == good
    assert (project / "params.yaml").read_bytes() != b"evil"
    assert collect_shard_results(exchange, "validate", 1, project) == 0
    close_exchange(exchange)


def test_a_worker_whose_shard_folder_cannot_be_made_is_told_which_setting(project, tmp_path, monkeypatch):
    exchange = open_exchange(project)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("EASEL_SHARD_DIR", str(tmp_path / "a-file"))
    refused = pytest.raises(EaselError, match=r"caption shard 1/2: cannot make its folder in .*a-file .*SHARD_DIR")
    with refused, shard_folder(exchange, "caption", 1, 2):
        pass


def downloaded_project(project: Path, images: int) -> tuple[list[str], list[str]]:
    """A DVC project whose download stage fetched `images` small files (and one URL failed), all
    accepted by validate: their sha256s and their paths in the manifest."""
    import pandas as pd

    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())  # the stages' inputs, as DVC resolves them
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    shas = [sha(f"image {i}".encode()) for i in range(images)]
    paths = [f"images/{s[:2]}/{s}.png" for s in shas]
    for i, path in enumerate(paths):
        (project / "data/download" / path).parent.mkdir(parents=True, exist_ok=True)
        (project / "data/download" / path).write_bytes(f"image {i}".encode())
    status = ["ok"] * images + ["http_404"]
    manifest = pd.DataFrame({"status": status, "sha256": [*shas, None], "path": [*paths, None]})
    accepted = pd.DataFrame({"sha256": shas, "image_path": [f"data/download/{p}" for p in paths]})
    (project / "data/validate").mkdir(parents=True)
    manifest.to_parquet(project / "data/download/manifest.parquet")
    accepted.to_parquet(project / "data/validate/accepted.parquet")
    return shas, paths


def test_validate_and_caption_shards_fetch_only_the_images_their_share_reads(project, s3_server, tmp_path):
    """The flow hands a validate shard its share of the distinct downloaded files (less those the
    inspection cache already holds), indexed in the archive it reads them from (`--archived`), a
    caption shard the images of its share of the batches (the share its run computes), unpacked;
    each as one archive; every other input comes whole."""
    from components.config import load_params
    from components.sharding import batches, share
    from components.validate.inspect import EMPTY_ROW, InspectionCache

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["caption"]["batch_size"] = 2  # 7 images in 4 batches: shard 0 of 2 takes batches 0 and 2
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shas, paths = downloaded_project(project, 7)
    params = load_params(project / "params.yaml")
    with InspectionCache(project / params.validate_.cache_dir, params.validate_.max_image_pixels) as cache:
        cache.put(shas[0], dict(EMPTY_ROW))
    (cached,) = [p.relative_to(project).as_posix() for p in cache.root.iterdir()]  # one part, one file
    exchange = open_exchange(project)
    client = make_client(s3_server.settings())

    def fetched_images(stage: str) -> set[str]:
        publish_stage_inputs(exchange, stage, project, 2)
        with shard_folder(exchange, stage, 0, 2) as folder:
            got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            handed = read_archive_index(folder / HANDED_IMAGES, folder) if stage == "validate" else {}
            read = {path: file.read() for path, file in handed.items()}
        assert {"params.yaml", "data/download/manifest.parquet"} <= got
        assert (cached if stage == "validate" else "data/validate/accepted.parquet") in got
        images = {p for p in got if p.startswith("data/download/images/")}
        if stage == "caption":
            assert HANDED_IMAGES not in got
            return images
        assert images == set()  # validate reads them in place, inside the archive
        assert all(data == (project / path).read_bytes() for path, data in read.items())
        return set(read)

    uncached = sorted(f"data/download/{p}" for p in paths[1:])
    assert fetched_images("validate") == set(share(uncached, (0, 2), key=str))
    rows = [r for batch in share(batches(list(range(7)), 2), (0, 2)) for r in batch]
    assert rows == [0, 1, 4, 5]
    assert fetched_images("caption") == {f"data/download/{paths[i]}" for i in rows}
    # No image is an object of its own: params.yaml, the manifest, the cache entry, accepted.parquet,
    # and one archive per shard of each stage.
    listed = client.list_objects_v2(Bucket=exchange.bucket, Prefix=exchange.objects())["Contents"]
    names = {item["Key"].rsplit("/", 1)[-1] for item in listed}
    assert not names & set(shas)
    assert len(names) == 4 + 2 * 2
    close_exchange(exchange)


def test_validate_shards_take_the_archives_download_shards_handed_back(project, s3_server, tmp_path, monkeypatch):
    """Where download ran sharded in the same run, validate shard K inspects the files download
    shard K handed back and fetches them from that shard's archive: no image is uploaded again. A
    file no download archive holds (fetched by an earlier run) is packed afresh. The shard reads
    its images inside the archives: neither they nor what else a download archive holds (its
    journal) are written as files in the validate shard's folder."""
    _, paths = downloaded_project(project, 7)
    exchange = open_exchange(project)
    client = make_client(s3_server.settings())
    monkeypatch.setenv("EASEL_SHARD_DIR", str(tmp_path / "shards"))
    params = (project / "params.yaml").read_bytes()
    client.put_object(Bucket=exchange.bucket, Key=exchange.objects(sha(params)), Body=params)
    put_listing(client, exchange, "download", "inputs", {"params.yaml": sha(params)})
    fetched_by = {0: [0, 2, 4], 1: [1, 3, 5]}  # image 6 came in an earlier run
    for shard, images in fetched_by.items():
        with shard_folder(exchange, "download", shard, 2) as folder:
            for i in images:
                (folder / "data/download" / paths[i]).parent.mkdir(parents=True, exist_ok=True)
                (folder / "data/download" / paths[i]).write_bytes(f"image {i}".encode())
            (folder / "data/download/journal").mkdir()
            (folder / f"data/download/journal/part-{shard}.jsonl").write_text("{}\n")
            publish_shard_results(exchange, "download", shard, 2, folder)

    def listing(stage: str, name: str) -> dict:
        return json.loads(client.get_object(Bucket=exchange.bucket, Key=exchange.listing(stage, name))["Body"].read())

    assert publish_stage_inputs(exchange, "validate", project, 2) > 7
    handed, written, fetched = {}, {}, {}
    for shard in (0, 1):
        with shard_folder(exchange, "validate", shard, 2) as folder:
            handed[shard] = {
                path: file.read() for path, file in read_archive_index(folder / HANDED_IMAGES, folder).items()
            }
            downloads = (folder / "data/download").rglob("*")
            written[shard] = {p.relative_to(folder).as_posix() for p in downloads if p.is_file()}
            fetched[shard] = sorted(p.name for p in (folder / ARCHIVE_DIR).iterdir())
    image = [f"data/download/{p}" for p in paths]
    assert handed == {k: {image[i]: f"image {i}".encode() for i in ([0, 2, 4, 6], [1, 3, 5])[k]} for k in (0, 1)}
    # Each shard's folder holds the manifest and the archives; no image, nor the journal.
    assert written == {0: {"data/download/manifest.parquet"}, 1: {"data/download/manifest.parquet"}}
    # Shard 1 reads download shard 1's archive, shard 0 download shard 0's and a new one of image 6 alone.
    download = [listing("download", f"shard-{k}-of-2")["archives"] for k in (0, 1)]
    validate = [listing("validate", f"inputs-shard-{k}-of-2")["archives"] for k in (0, 1)]
    assert validate[1] == download[1] and validate[0][:-1] == download[0] and len(validate[0]) == 2
    assert fetched == {k: sorted(f"{a}.tar" for a in validate[k]) for k in (0, 1)}
    body = client.get_object(Bucket=exchange.bucket, Key=exchange.objects(validate[0][-1]))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == [image[6]]
    close_exchange(exchange)


def test_an_image_the_table_names_outside_the_image_folders_is_not_handed_out(project, s3_server):
    """A table that names a file outside the stage's image folders (here, the project's params)
    stops the hand-out with the file's name: a shard must not be sent other files as images."""
    import pandas as pd

    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    (project / "data/validate").mkdir(parents=True)
    accepted = pd.DataFrame({"sha256": [sha(b"x")], "image_path": ["params.yaml"]})
    accepted.to_parquet(project / "data/validate/accepted.parquet")
    exchange = open_exchange(project)
    refused = r"caption shard 0/1 images: params.yaml is not a file in data/download/images/"
    with pytest.raises(EaselError, match=refused):
        publish_stage_inputs(exchange, "caption", project, 1)
    close_exchange(exchange)
