"""Shards hand their inputs and results over through the object store, never through a shared folder.

Before a sharded stage runs its shards (components.sharding), the flow publishes what the stage
reads: its DVC dependencies (its code included), params.yaml, the caches a rerun starts from, and
the model folders inside the project that it loads. Each file becomes an object named by its
sha256 under a prefix of the run's own, `s3://<bucket>/<storage.shard_prefix>/<run>/`, and the
stage gets a listing {path: sha256}. A shard runs in a fresh, empty folder of its own, on whichever
machine runs it: it fetches the listing's files, runs `easel <stage> --shard K/N` there with that
code, and publishes the cache files it wrote, packed in one archive object, with a listing of its
own. The merge fetches every shard's archive and writes its files into the project's caches,
where the DVC stage then finds the work done. When the run ends, its prefix is deleted.

The images validate and caption read travel as archives, never one object per image: per
request, boto3 and the S3 server spend more CPU than on the bytes of a small image, and the server
more per byte it receives than per byte it sends (benchmarks/RESULTS.md). A caption shard gets one
archive of the files its share of the batches reads, packed by the flow. Validate's shares follow
download's: where download ran sharded in the same run, validate shard K inspects the files that
download shard K handed back and fetches that shard's archive, already in the exchange; only the
files no such archive holds are packed afresh. A validate shard reads its images in place, inside
the archives (READS_ARCHIVES), from an index the flow writes in its folder (`easel validate
--shard K/N --archived`): it fetches its share and nothing else, and creates no file per image.

A worker needs only the project's Python environment and S3: `EASEL_S3_ENDPOINT` with
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (a worker on the flow's machine may use the embedded
server instead). `EASEL_SHARD_DIR` says where a worker makes its shard folders (default: the
system's temp folder); each is deleted when its shard ends.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from components.config import Params, StorageParams, load_params
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_write_json, inside_folder, sha256_file, temp_beside
from components.plumbing.scratch import ScratchDir
from components.sharding import share

SHARD_DIR_ENV = "EASEL_SHARD_DIR"
TRANSFER_THREADS = 8  # concurrent object transfers: many small files (images, cache entries)


@functools.lru_cache(maxsize=1)
def _one_thread_per_transfer():
    """boto3's transfer settings for one file in one thread: TRANSFER_THREADS already run files side
    by side, and by default each upload_file/download_file call starts and ends a pool of its own.
    That churn of threads, beside the profiler that Dask workers run by default (which walks every
    thread's frames), deadlocked a shard in CPython 3.11: its worker stopped answering, Dask
    restarted it after minutes, and the shard ran again."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(use_threads=False)


# What each sharded stage's shards fill: handed back to the merge, and handed out to the shards so
# that a rerun redoes nothing the project already has (paths relative to the project folder).
SHARD_CACHES: dict[str, Callable[[Params], list[str]]] = {
    "download": lambda p: [f"{p.download.out_dir}/images", f"{p.download.out_dir}/journal"],
    "validate": lambda p: [p.validate_.cache_dir],
    "caption": lambda p: [f"{p.caption.out_dir}/cache.jsonl", f"{p.caption.out_dir}/cache.parts"],
    "evaluate": lambda p: [p.evaluate.cache_dir],
}
# The models each stage's shard loads (the `models.*` keys its DVC stage tracks); those that are
# folders or files inside the project (the tiny set) travel with the inputs, hub ids do not.
SHARD_MODELS = {
    "download": (),
    "validate": ("clip_model", "aesthetic"),
    "caption": ("blip", "tagger"),
    "evaluate": ("sdxl", "sdxl_config", "vae", "clip_model", "clip_pretrained", "aesthetic"),
}

# Image folders a shard does not fetch whole: it gets an archive of the files its share reads
# (`validate_needs`, `caption_needs`).
SHARD_IMAGES: dict[str, Callable[[Params], list[str]]] = {
    "validate": lambda p: [f"{p.download.out_dir}/images"],
    "caption": lambda p: [f"{p.download.out_dir}/images", f"{p.validate_.out_dir}/images"],
}


# Stages whose shards read their images in place, inside the archives fetched into ARCHIVE_DIR,
# instead of unpacked into files: creating files costs more here than filling them
# (benchmarks/RESULTS.md). The flow hands such a shard an index of where each of its images lies
# (HANDED_IMAGES, in the shard's folder; validate reads it: --archived).
HANDED_IMAGES = ".easel/shard-images.json"
READS_ARCHIVES = {"validate"}
ARCHIVE_DIR = ".easel/shard-archives"
# Stages whose shares the hand-out deals along the archives another stage's shards handed back in
# the same run: their images are in the exchange already, and go out again without a new upload.
SHARES_FOLLOW = {"validate": "download"}


def validate_needs(params: Params, folder: Path) -> dict[str, str]:
    """The image files validate's shards read between them, found from the manifest in `folder`
    (the project's): {path: sha256} of the distinct files not in the inspection cache yet."""
    from components.validate.stage import files_to_inspect

    return files_to_inspect(params.validate_, Path(params.download.out_dir), folder)


def caption_needs(params: Params, folder: Path, shards: int) -> list[dict[str, str]]:
    """The image files each of caption's `shards` shards reads, found from the accepted table in
    `folder` (the project's), read once: [{path: ""}] (the table gives no sha256)."""
    from components.caption.stage import files_by_shard

    return [
        dict.fromkeys(files, "")
        for files in files_by_shard(params.caption, Path(params.validate_.out_dir), folder, shards)
    ]


@dataclass(frozen=True)
class Exchange:
    """Where one run's shards swap files. Holds no secret: it travels as a task parameter."""

    run: str
    bucket: str
    prefix: str  # <storage.shard_prefix>/<run>
    storage: dict  # the project's storage section (no credentials in it), the embedded data_dir absolute

    def objects(self, sha256: str = "") -> str:
        return f"{self.prefix}/objects/{sha256}"

    def listing(self, stage: str, name: str) -> str:
        return f"{self.prefix}/{stage}/{name}.json"


def shard_listing_name(shard: int, shards: int) -> str:
    return f"shard-{shard}-of-{shards}"


def _images_listing(exchange: Exchange, stage: str, shard: int, shards: int) -> str:
    """The listing of the images shard K/N of `stage` reads (their archive)."""
    return exchange.listing(stage, "inputs-" + shard_listing_name(shard, shards))


def open_exchange(project_dir: Path | str) -> Exchange:
    """A new run-scoped exchange for the project's bucket."""
    project_dir = Path(project_dir).resolve()
    params = load_params(project_dir / "params.yaml")
    storage = params.storage.model_dump()
    data_dir = Path(storage["embedded"]["data_dir"])
    storage["embedded"]["data_dir"] = str(data_dir if data_dir.is_absolute() else project_dir / data_dir)
    run = uuid.uuid4().hex[:16]
    return Exchange(run, params.storage.bucket, f"{params.storage.shard_prefix.strip('/')}/{run}", storage)


@contextlib.contextmanager
def _client(exchange: Exchange, what: str) -> Iterator[object]:
    from components.storage import make_client, resolve_settings, storage_errors

    settings = resolve_settings(StorageParams.model_validate(exchange.storage))
    with storage_errors(settings, f"shard exchange {exchange.prefix}: {what}"):
        yield make_client(settings)


# -- files -------------------------------------------------------------------------------------------


def _files_under(root: Path, rel: str, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """The files at `rel` (a file, or every file below a folder, through symlinks), as relative POSIX
    paths; bytecode caches left out (Python writes its own), and the folders in `skip` (relative
    POSIX paths ending in "/")."""
    if (PurePosixPath(rel).as_posix() + "/").startswith(skip):
        return
    top = root / rel
    if top.is_file():
        yield PurePosixPath(rel).as_posix()
        return
    for folder, dirs, files in os.walk(top, followlinks=True):
        here = Path(folder).relative_to(root).as_posix() + "/"
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and here + d + "/" not in skip)
        for name in sorted(files):
            if not name.endswith((".pyc", ".tmp")):
                yield (Path(folder) / name).relative_to(root).as_posix()


def _hash_files(root: Path, rels: list[str], skip: tuple[str, ...] = ()) -> dict[str, str]:
    found: dict[str, str] = {}
    for rel in rels:
        for path in _files_under(root, rel, skip):
            found[path] = sha256_file(root / path)
    return found


def stage_inputs(stage: str, project_dir: Path | str) -> list[str]:
    """What a shard of `stage` reads, relative to the project: params.yaml, the stage's DVC dependencies
    (code and data, as dvc.yaml resolves them), its caches, and its models that live in the project."""
    from dvc.repo import Repo

    project_dir = Path(project_dir).resolve()
    params = load_params(project_dir / "params.yaml")
    with Repo(str(project_dir)) as repo:
        (dvc_stage,) = repo.stage.collect(stage)
        deps = [str(dep.def_path) for dep in dvc_stage.deps]
    models = []
    for key in SHARD_MODELS[stage]:
        value = getattr(params.models, key)
        if isinstance(value, str) and value:
            path = Path(value.removeprefix("local-dir:"))
            inside = not path.is_absolute() and ".." not in path.parts
            if inside and (project_dir / path).exists():
                models.append(path.as_posix())
    wanted = ["params.yaml", *deps, *SHARD_CACHES[stage](params), *models]
    return [rel for rel in dict.fromkeys(wanted) if (project_dir / rel).exists()]


# -- transfers ---------------------------------------------------------------------------------------


def _upload(exchange: Exchange, root: Path, files: dict[str, str], what: str) -> int:
    """Upload the objects of `files` ({path: sha256}) that the run does not hold yet; returns how many."""
    with _client(exchange, what) as client:
        present: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=exchange.bucket, Prefix=exchange.objects()):
            present.update(item["Key"].rsplit("/", 1)[-1] for item in page.get("Contents", []))
        todo = {sha: path for path, sha in files.items() if sha not in present}

        def put(item: tuple[str, str]) -> None:
            sha, path = item
            client.upload_file(
                str(root / path), exchange.bucket, exchange.objects(sha), Config=_one_thread_per_transfer()
            )

        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            list(pool.map(put, todo.items()))
    return len(todo)


def _put_listing(exchange: Exchange, key: str, files: dict[str, str], what: str, archives: Sequence[str] = ()) -> None:
    document = {"files": files} | ({"archives": list(archives)} if archives else {})
    with _client(exchange, what) as client:
        client.put_object(Bucket=exchange.bucket, Key=key, Body=json.dumps(document, sort_keys=True).encode())


def _get_listing(exchange: Exchange, key: str, what: str) -> dict[str, str]:
    return _get_listing_document(exchange, key, what)[0]


def _get_listing_document(exchange: Exchange, key: str, what: str) -> tuple[dict[str, str], list[str]]:
    """A listing's {path: sha256}, and the sha256s of the archive objects that hold them (none: one
    object per file)."""
    from botocore.exceptions import ClientError

    with _client(exchange, what) as client:
        try:
            body = client.get_object(Bucket=exchange.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise EaselError(f"s3://{exchange.bucket}/{key}: missing ({what})") from None
            raise
    try:
        document = json.loads(body)
        files, archives = document["files"], document.get("archives", [])
        if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
            raise ValueError("not {path: sha256}")
        if not (isinstance(archives, list) and all(isinstance(a, str) and len(a) == 64 for a in archives)):
            raise ValueError("the archives are not a list of sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EaselError(f"s3://{exchange.bucket}/{key}: not a shard listing ({exc})") from None
    return files, archives


def _missing(root: Path, files: dict[str, str], source: str) -> tuple[dict[str, Path], list[str]]:
    """Where each listed file goes in `root` (refused outside it), and those not there with their content."""
    targets = {path: inside_folder(root, path, source) for path in files}
    return targets, [p for p, target in targets.items() if not (target.is_file() and sha256_file(target) == files[p])]


def _get_object(client, exchange: Exchange, sha256: str, tmp: str, name: str) -> None:
    """Stream the object `sha256` into `tmp`, hashed on the way, and check its bytes; `name` says
    what it is in errors. One GET: boto3's download_file spent twice the CPU per small file."""
    from botocore.exceptions import ClientError

    source = f"s3://{exchange.bucket}/{exchange.prefix}"
    try:
        body = client.get_object(Bucket=exchange.bucket, Key=exchange.objects(sha256))["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
            raise
        raise EaselError(f"{source}: {name} is missing") from None
    with body, open(tmp, "wb") as out:
        got = _copy_hashed(body, out)
    if got != sha256:
        raise EaselError(f"{source}: {name} does not match its sha256; refused")


def _copy_hashed(stream, out) -> str:
    """Copy `stream` to `out`; the sha256 of what was copied."""
    digest = hashlib.sha256()
    while block := stream.read(1 << 20):
        digest.update(block)
        out.write(block)
    return digest.hexdigest()


def _download(exchange: Exchange, root: Path, files: dict[str, str], what: str) -> int:
    """Fetch `files` ({path: sha256}) into `root`, each checked against its sha256 and written
    atomically; a file already there with that content is kept. Returns how many were fetched."""
    targets, todo = _missing(root, files, f"s3://{exchange.bucket}/{exchange.prefix}")
    with _client(exchange, what) as client:

        def get(path: str) -> None:
            # Streamed to a temp file beside the target (a model's weights do not fit in memory), checked, renamed.
            target = targets[path]
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_beside(target)
            os.close(fd)
            try:
                _get_object(client, exchange, files[path], tmp, f"the object for {path}")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            list(pool.map(get, todo))
    return len(todo)


class _Hashed:
    """A file read or written through it is hashed on the way (sha256): tarfile reads each member
    and writes the archive through one, so that packing reads every byte once."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.digest, self.position = fh, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.position += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.position


def _pack(folder: Path, paths: Sequence[str], pack: Path) -> tuple[dict[str, str], str]:
    """Write the files `paths` (in `folder`) into one uncompressed tar at `pack`, reading each once:
    ({path: sha256}, the archive's sha256). One object per shard instead of one per file: per
    request, S3 costs more than the bytes."""
    files: dict[str, str] = {}
    with open(pack, "wb") as raw:
        out = _Hashed(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(paths):
                info = tar.gettarinfo(folder / path, arcname=path)
                with open(folder / path, "rb") as fh:
                    member = _Hashed(fh)
                    tar.addfile(info, member)  # exactly info.size bytes, the ones hashed
                files[path] = member.digest.hexdigest()
    return files, out.digest.hexdigest()


def _archive_members(
    exchange: Exchange,
    files: dict[str, str],
    archives: list[str],
    into: Path,
    what: str,
    held: contextlib.ExitStack,
    keep: bool = False,
) -> dict[str, tuple[Path, tarfile.TarFile, tarfile.TarInfo]]:
    """Fetch the archive objects into `into` (each checked against its sha256; kept as
    `<sha256>.tar` or deleted when `held` closes) and find each of `files` in them: (archive file,
    open archive, member). Headers only: every archive is judged before anything is written. Each member
    a listing names must be a regular file; every listed file must be found. Members the listing
    does not name are not read (an archive another stage's shard packed holds more than this listing)."""
    source = f"s3://{exchange.bucket}/{exchange.prefix}"
    found: dict[str, tuple[Path, tarfile.TarFile, tarfile.TarInfo]] = {}
    into.mkdir(parents=True, exist_ok=True)
    try:
        for archive in archives:
            if keep:
                path = into / f"{archive}.tar"
                tmp = str(path) + ".tmp"
                held.callback(Path(tmp).unlink, missing_ok=True)
            else:
                fd, tmp = tempfile.mkstemp(dir=into, prefix="shard-archive.", suffix=".tar")
                os.close(fd)
                path = Path(tmp)
                held.callback(path.unlink, missing_ok=True)
            with _client(exchange, what) as client:
                _get_object(client, exchange, archive, tmp, f"the archive object of {what}")
            if keep:
                os.replace(tmp, path)
            tar = held.enter_context(tarfile.open(path, "r:"))  # noqa: SIM115 (closed with `held`)
            for member in tar.getmembers():
                if member.name not in files:
                    continue
                if not member.isfile() or member.issparse():
                    problem = f"archive member {member.name!r} is not a file its listing names"
                    raise EaselError(f"{source}: {what}: {problem}; refused")
                found.setdefault(member.name, (path, tar, member))
    except tarfile.TarError as exc:
        raise EaselError(f"{source}: the archive object of {what} cannot be read ({exc})") from None
    lacking = sorted(set(files) - set(found))
    if lacking:
        raise EaselError(f"{source}: {what}: the archives lack {lacking[:3]}; refused")
    return found


def _unpack(exchange: Exchange, root: Path, files: dict[str, str], archives: list[str], what: str) -> int:
    """Fetch the archive objects that hold `files` and write each listed file into `root`, checked
    like single objects: an archive against its sha256, every member (`_archive_members`) against
    the listing's sha256. A file already there with that content is kept. Returns how many were written."""
    source = f"s3://{exchange.bucket}/{exchange.prefix}"
    targets, missing = _missing(root, files, source)
    if not missing:
        return 0
    # The archives go to a scratch folder in the git-ignored .easel: a killed hand-out's go with the next one.
    with ScratchDir("shard-archives", root / ".easel") as scratch, contextlib.ExitStack() as held:
        found = _archive_members(exchange, {p: files[p] for p in missing}, archives, scratch, what, held)
        for path in missing:
            _, tar, member = found[path]
            _write_checked(tar.extractfile(member), targets[path], files[path], source)
    return len(missing)


def _place_archived(exchange: Exchange, folder: Path, files: dict[str, str], archives: list[str], what: str) -> None:
    """Fetch the archive objects that hold `files` into the shard's folder, and write the index
    (HANDED_IMAGES) of where each file's bytes lie in them: the shard reads them in place
    (`components.plumbing.fsutil.read_archive_index`), and no file is created per image."""
    with contextlib.ExitStack() as held:
        found = _archive_members(exchange, files, archives, folder / ARCHIVE_DIR, what, held, keep=True)
        index = {
            path: [archive.relative_to(folder).as_posix(), member.offset_data, member.size, files[path]]
            for path, (archive, _, member) in sorted(found.items())
        }
    atomic_write_json(folder / HANDED_IMAGES, index)


def _write_checked(stream, target: Path, sha256: str, source: str) -> None:
    """Copy `stream` to `target` through a temp file beside it, renamed only if its sha256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _copy_hashed(stream, out)
        if got != sha256:
            raise EaselError(f"{source}: the archived {target.name} does not match its sha256; refused")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the three steps -----------------------------------------------------------------------------------


def _image_folders(stage: str, params: Params) -> tuple[str, ...]:
    return tuple(PurePosixPath(f).as_posix() + "/" for f in SHARD_IMAGES.get(stage, lambda p: [])(params))


def _publish_packed(
    exchange: Exchange,
    folder: Path,
    paths: Sequence[str],
    key: str,
    what: str,
    held: dict[str, str] | None = None,
    archives: Sequence[str] = (),
) -> None:
    """The files `paths` (in `folder`) as one archive object, with the listing `key` naming it and
    their sha256s; the listing also names `held`, files that the `archives` already in the exchange hold."""
    archives, files = list(archives), {}
    if paths:
        # In the folder's git-ignored .easel, never in a cache that is handed over; a scratch folder,
        # so that the archive of a hand-out that is killed goes with the next hand-out.
        with ScratchDir("shard-pack", folder / ".easel") as scratch:
            pack = scratch / "pack.tar"
            files, packed = _pack(folder, paths, pack)
            archives.append(packed)
            _upload(exchange, folder, {pack.relative_to(folder).as_posix(): archives[-1]}, what)
    _put_listing(exchange, key, (held or {}) | files, what, archives)


def _handed_back(exchange: Exchange, stage: str, shards: int) -> list[tuple[dict[str, str], list[str]]]:
    """What each of the `shards` shards of `stage` handed back in this run ({path: sha256} and its
    archives); empty when the stage did not run with that many shards."""
    prefix = exchange.listing(stage, "shard-").removesuffix(".json")
    with _client(exchange, f"{stage} shard results") as client:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=exchange.bucket, Prefix=prefix)
        present = {item["Key"] for page in pages for item in page.get("Contents", [])}
    keys = [exchange.listing(stage, shard_listing_name(k, shards)) for k in range(shards)]
    if not all(key in present for key in keys):
        return []
    return [_get_listing_document(exchange, key, f"{stage} shard results") for key in keys]


def deal_along_archives(
    needed: dict[str, str], archived: list[tuple[dict[str, str], list[str]]], shards: int
) -> list[tuple[dict[str, str], list[str], list[str]]]:
    """Each shard's (files an archive in the exchange holds, those archives, files to pack afresh):
    the needed files that archive J's listing names with the same sha256 go to shard J mod N with
    the archive; the rest are dealt every N-th in the order of their path's stable hash."""
    shares: list[tuple[dict[str, str], list[str], list[str]]] = [({}, [], []) for _ in range(shards)]
    left = dict(needed)
    for j, (files, archives) in enumerate(archived):
        held, refs, _ = shares[j % shards]
        mine = {path: sha for path, sha in files.items() if left.get(path) == sha}
        if mine:
            held.update(mine)
            refs.extend(a for a in archives if a not in refs)
            for path in mine:
                del left[path]
    for k in range(shards):
        shares[k][2].extend(share(sorted(left), (k, shards), key=str))
    return shares


def publish_stage_inputs(exchange: Exchange, stage: str, project_dir: Path | str, shards: int) -> int:
    """Put what the stage's `shards` shards read in the exchange; returns the number of files listed.
    Every shard reads the common inputs; of the images, each gets those of its share, in archives."""
    project_dir = Path(project_dir).resolve()
    params = load_params(project_dir / "params.yaml")
    images = _image_folders(stage, params)
    common = _hash_files(project_dir, stage_inputs(stage, project_dir), skip=images)
    _upload(exchange, project_dir, common, f"{stage} inputs")
    _put_listing(exchange, exchange.listing(stage, "inputs"), common, f"{stage} inputs")
    listed = len(common)
    if not images:
        return listed
    if stage in SHARES_FOLLOW:
        needed = validate_needs(params, project_dir)
        _check_images(f"{stage} images", needed, images, project_dir)
        dealt = deal_along_archives(needed, _handed_back(exchange, SHARES_FOLLOW[stage], shards), shards)
    else:
        dealt = []
        for shard, needed in enumerate(caption_needs(params, project_dir, shards)):
            _check_images(f"{stage} shard {shard}/{shards} images", needed, images, project_dir)
            dealt.append(({}, [], sorted(needed)))
    for shard, (held, archives, fresh) in enumerate(dealt):
        what = f"{stage} shard {shard}/{shards} images"
        key = _images_listing(exchange, stage, shard, shards)
        _publish_packed(exchange, project_dir, fresh, key, what, held, archives)
        listed += len(held) + len(fresh)
    return listed


def _check_images(what: str, needed: dict[str, str], images: tuple[str, ...], project_dir: Path) -> None:
    """A table that names a file outside the stage's image folders stops the hand-out: a shard must
    not be sent other files as images."""
    outside = [p for p in sorted(needed) if not p.startswith(images) or not (project_dir / p).is_file()]
    if outside:
        raise EaselError(f"{what}: {outside[0]} is not a file in {', '.join(images)}")


@contextlib.contextmanager
def shard_folder(exchange: Exchange, stage: str, shard: int, shards: int) -> Iterator[Path]:
    """A fresh folder for one shard, holding the stage's inputs; deleted when the shard ends, or by
    the next shard on this worker should this one be killed (a preempted worker)."""
    root = Path(os.environ.get(SHARD_DIR_ENV) or Path(tempfile.gettempdir()) / "easel-shards")
    try:
        scratch = ScratchDir(f"{exchange.run}-{stage}-{shard}of{shards}", root)
    except OSError as exc:
        raise EaselError(
            f"{stage} shard {shard}/{shards}: cannot make its folder in {root} ({exc.strerror or exc}); "
            f"set {SHARD_DIR_ENV} to a writable folder on this worker"
        ) from None
    folder = scratch.path
    try:
        inputs = _get_listing(exchange, exchange.listing(stage, "inputs"), f"{stage} inputs")
        what = f"{stage} shard {shard}/{shards} inputs"
        _download(exchange, folder, inputs, what)
        if stage in SHARD_IMAGES:
            key = _images_listing(exchange, stage, shard, shards)
            images, archives = _get_listing_document(exchange, key, f"{stage} shard {shard}/{shards} images")
            what = f"{stage} shard {shard}/{shards} images"
            if stage in READS_ARCHIVES:
                _place_archived(exchange, folder, images, archives, what)
            else:
                _unpack(exchange, folder, images, archives, what)
        yield folder
    finally:
        scratch.cleanup()


def publish_shard_results(exchange: Exchange, stage: str, shard: int, shards: int, folder: Path) -> int:
    """Hand back the cache files this shard wrote (new, or changed from its inputs); returns how many."""
    params = load_params(folder / "params.yaml")
    inputs = _get_listing(exchange, exchange.listing(stage, "inputs"), f"{stage} inputs")
    caches = [rel for rel in SHARD_CACHES[stage](params) if (folder / rel).exists()]
    now = [path for rel in caches for path in _files_under(folder, rel)]
    # Only a file the inputs hold needs hashing here, to see if it changed; the others are hashed as they are packed.
    written = [path for path in now if path not in inputs or sha256_file(folder / path) != inputs[path]]
    what = f"{stage} shard {shard}/{shards} results"
    _publish_packed(exchange, folder, written, exchange.listing(stage, shard_listing_name(shard, shards)), what)
    return len(written)


def collect_shard_results(exchange: Exchange, stage: str, shards: int, project_dir: Path | str) -> int:
    """The merge's first step: every shard's files into the project's caches. Returns how many were
    fetched; a shard that handed nothing back is an error naming it."""
    project_dir = Path(project_dir).resolve()
    fetched = 0
    for shard in range(shards):
        name = shard_listing_name(shard, shards)
        files, archives = _get_listing_document(
            exchange, exchange.listing(stage, name), f"{stage} shard {shard}/{shards} handed nothing back"
        )
        what = f"{stage} shard {shard}/{shards} results"
        if archives:
            fetched += _unpack(exchange, project_dir, files, archives, what)
        else:
            fetched += _download(exchange, project_dir, files, what)
    return fetched


def close_exchange(exchange: Exchange) -> int:
    """Delete everything the run put under its prefix; returns the number of objects deleted."""
    deleted = 0
    with _client(exchange, "clean-up") as client:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=exchange.bucket, Prefix=exchange.prefix + "/"
        ):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=exchange.bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
    return deleted
