"""Archive sources: a .zip, .tar, .tar.gz (.tgz) or WebDataset shards, local, in S3 or by URL.

A source whose `path` ends in an archive suffix is read member by member, never extracted to disk:
- tar and tar.gz (and so WebDataset shards, which are plain tars) are read as one stream, from a
  file, an S3 object body or an HTTP response body;
- a zip keeps its index at its end, so a remote zip is first copied to a temporary file, then
  read one member at a time (a local zip is read in place).
Shards are named with WebDataset's brace notation: `posters-{000000..000123}.tar`, `{a,b}.tar`. A glob
after `#` keeps only the image members it matches: `PosterLayout.zip#train/inpainted_poster/*`
(fnmatch: `*` also crosses folders).

Every image member (by suffix, as for a local folder) becomes a manifest row like any fetched URL:
its outcome, sha256 and path in the content-addressed store, plus `src_archive`, `src_member`,
`src_key` (WebDataset's sample key: the member's path up to the first dot of its file name) and
`src_caption`, taken from a sidecar file: `<stem>.txt`, else `<stem>.caption`, else the `caption`
(or `text`) field of `<stem>.json`, where <stem> is the image's path without its suffix, or else
its WebDataset key (`0001.txt` captions `0001.jpg` and `0001.seg.png`).

Nothing in an archive is trusted:
- a member named with `..`, an absolute path or a drive letter, a symlink, a hard link or a device
  is refused and reported (`unsafe_member`); files are named by their sha256 anyway, never by the
  member's name;
- an image member larger than `download.max_bytes` is refused (`too_large`) on its declared size,
  and reading any member stops at that many bytes, whatever its header says (a decompression bomb
  in a gzip or deflate stream is cut off there); sidecars are read up to 1 MiB;
- the image header is parsed before a file is kept (`decompression_bomb` above the pixel limit);
- by URL, the host is checked as for every download (private addresses refused at connect time,
  TLS verified, redirects re-checked, `X-Robots-Tag` opt-outs honoured).

Every archive is read as an untrusted stream: at most `download.max_archive_bytes` bytes and for at
most `download.archive_timeout_s` seconds in all (a server that drips a byte per read timeout, or a
local tar.gz with a huge member to skip, ends as `timeout`), and a remote zip is not copied past that
size. A member that cannot be read (a damaged sidecar too) gets its own `corrupt_member` row and the
next member is read; two members with one name get a row each (the second's URL ends `#2`).

An archive that cannot be read at all is one row with its outcome (`http_404`, `not_archive`,
`truncated`, ...); rows already read from a truncated archive are kept before it: a tar cut inside a
member's data or a header is `truncated`, and one whose later header is damaged ends with a
`corrupt_member` row (tarfile alone takes either for the end of the archive).
A finished archive is indexed in out_dir/archives/: a rerun reuses the index while the archive is
unchanged (size and mtime of a file; ETag or Last-Modified and size of an S3 object or URL) and its
images are in the store, and reads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import io
import itertools
import json
import os
import random
import re
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import aiohttp
import pandas as pd
from botocore.exceptions import BotoCoreError

from components.config import SourceParams
from components.download.fetch import (
    TRANSIENT_HTTP,
    Fetcher,
    FetchResult,
    FetchSettings,
    RefusedAddress,
    backoff_delay,
    refused_host,
    sniff_image_type,
)
from components.download.sources import IMAGE_SUFFIXES, _frame
from components.download.store import ImageStore
from components.download.worker import RECORD_FIELDS, record_for
from components.plumbing.errors import ConfigError, EaselError
from components.plumbing.fsutil import atomic_write_json

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
CAPTION_SUFFIXES = (".txt", ".caption", ".json")  # in the order a caption is taken from them
MAX_SIDECAR_BYTES = 1 << 20
MAX_SHARDS = 100_000
INDEX_VERSION = 1
EXTRA_COLUMNS = ("archive", "member", "key", "caption", "sidecar")


class ArchiveUnavailable(Exception):
    """An archive that could not be opened or read to its end; `status` is its manifest outcome."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


# What reading an archive from a file, an S3 body or an HTTP body can raise when the bytes are bad or stop.
STREAM_ERRORS = (
    ArchiveUnavailable,
    OSError,  # includes TimeoutError and gzip's BadGzipFile
    EOFError,
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    UnicodeDecodeError,  # a damaged zip directory's file name
    NotImplementedError,  # a zip "version" or compression zipfile does not read (damage, mostly)
    aiohttp.ClientError,
    BotoCoreError,
)


# -- which sources are archives -------------------------------------------------------------------


def _path_part(path: str) -> str:
    return urlsplit(path).path if path.startswith(("http://", "https://")) else path


def split_pattern(path: str) -> tuple[str, str | None]:
    """`archive.zip#train/inpainted_poster/*` -> (the archive, the glob its image members must match)."""
    archive, sep, pattern = path.rpartition("#")
    if sep and _path_part(archive).lower().endswith(ARCHIVE_SUFFIXES):
        return archive, pattern
    return path, None


def is_archive_source(path: str) -> bool:
    return _path_part(split_pattern(path)[0]).lower().endswith(ARCHIVE_SUFFIXES)


def split_sources(specs: list[SourceParams]) -> tuple[list[SourceParams], list[SourceParams]]:
    """(URL-list, folder and s3-prefix sources; archive sources). A source by URL must be an archive."""
    archives = [s for s in specs if is_archive_source(s.path)]
    for spec in specs:
        if spec.path.startswith(("http://", "https://")) and spec not in archives:
            raise ConfigError(
                f"params.yaml: download.sources: {spec.name!r}: {spec.path} is a URL; a source by URL must be an "
                f"archive ({', '.join(ARCHIVE_SUFFIXES)}, or WebDataset shards)"
            )
    for spec in archives:
        if split_pattern(spec.path)[1] == "":
            raise ConfigError(
                f"params.yaml: download.sources: {spec.name!r}: {spec.path}: an empty member pattern after #"
            )
        if spec.url_column != "url" or spec.url_prefix is not None:
            raise ConfigError(
                f"params.yaml: download.sources: {spec.name!r}: url_column and url_prefix do not apply to an archive"
            )
    return [s for s in specs if s not in archives], archives


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str, source: str) -> list[str]:
    """WebDataset's shard notation: `{000..012}` (zero padding kept) and `{a,b,c}`, any number of groups."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"params.yaml: download.sources: {source!r}: {pattern}: {why}")

    groups: list[list[str]] = []
    for body in _BRACES.findall(pattern):
        if ".." in body:
            low, _, high = body.partition("..")
            if not (low.isdigit() and high.isdigit()):
                raise bad(f"{{{body}}} is not a range of whole numbers like {{000..009}}")
            if int(low) > int(high):
                raise bad(f"{{{body}}} runs backwards")
            width = len(low) if low.startswith("0") or high.startswith("0") else 0
            groups.append([str(n).zfill(width) for n in range(int(low), int(high) + 1)])
        elif "," in body:
            groups.append(body.split(","))
        else:
            raise bad(f"{{{body}}} is neither a range (a..b) nor a list (a,b)")
        if len(groups[-1]) > MAX_SHARDS:
            raise bad(f"more than {MAX_SHARDS} shards")
    if "{" in _BRACES.sub("", pattern) or "}" in _BRACES.sub("", pattern):
        raise bad("unbalanced or nested braces")
    literals = _BRACES.split(pattern)[0::2]  # the text around the groups
    names = []
    for choice in itertools.product(*groups):
        names.append(literals[0] + "".join(c + after for c, after in zip(choice, literals[1:], strict=True)))
        if len(names) > MAX_SHARDS:
            raise bad(f"more than {MAX_SHARDS} shards")
    return names


# -- member names and reading ---------------------------------------------------------------------


def unsafe_name(name: str) -> str | None:
    """Why a member's name is refused, or None. Backslashes count as separators (zips made on Windows)."""
    text = name.replace("\\", "/")
    if not text:
        return "an empty name (a damaged directory, mostly)"
    if "\x00" in text:
        return "a NUL byte in its name"
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return "an absolute path"
    if ".." in PurePosixPath(text).parts:
        return "a '..' component in its path"
    return None


def webdataset_key(name: str) -> str:
    """The sample key: the path up to the first dot of the file name (WebDataset's base_plus_ext)."""
    folder, _, base = name.replace("\\", "/").rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _stem(name: str) -> str:
    text = name.replace("\\", "/")
    base = text.rpartition("/")[2]
    return text[: len(text) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)


def _suffix(name: str) -> str:
    base = name.replace("\\", "/").rpartition("/")[2]
    return "." + base.rsplit(".", 1)[1].lower() if "." in base else ""


def read_at_most(fh: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes, in chunks: a member's declared size is never trusted."""
    chunks, size = [], 0
    while size < limit:
        chunk = fh.read(min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@dataclass
class Member:
    name: str
    kind: str  # file | dir | link | special
    size: int
    open: Callable[[], BinaryIO] | None = None


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a header it cannot read (cut short, or a bad checksum) after
    the first: here those end it with an outcome. The first header's problems stay tarfile's own
    ReadError (`not_archive`)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.TruncatedHeaderError:
            if tar.offset == 0:
                raise
            raise ArchiveUnavailable("truncated", "the archive ends inside a member header") from None
        except tarfile.InvalidHeaderError as exc:
            if tar.offset == 0:
                raise
            raise ArchiveUnavailable("corrupt_member", f"a damaged member header at byte {tar.offset}: {exc}") from None


def tar_members(stream: BinaryIO) -> Iterator[Member]:
    """The members of a tar (gzip, bzip2 or xz compressed or not) read as a stream, in order."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo)  # noqa: SIM115 (closed below)
    except TypeError as exc:  # tarfile's gzip-header reader on a header cut short calls ord(b"")
        raise EOFError(f"the archive's gzip header is cut short ({exc})") from None
    with tar:
        for info in tar:
            if info.isreg():
                kind = "file"
            elif info.isdir():
                kind = "dir"
            elif info.issym() or info.islnk():
                kind = "link"
            else:
                kind = "special"
            # Read before the next member: a stream cannot go back.
            yield Member(info.name, kind, info.size, (lambda info=info: tar.extractfile(info)))


def zip_members(archive: zipfile.ZipFile) -> Iterator[Member]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if info.filename.endswith("/"):  # ZipInfo.is_dir() fails on the empty name of a damaged directory
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "link"
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            kind = "special"
        else:
            kind = "file"
        yield Member(info.filename, kind, info.file_size, (lambda info=info: archive.open(info)))


# -- where archives come from ---------------------------------------------------------------------


@dataclass
class Opened:
    stream: BinaryIO
    identity: str | None  # what says the archive is unchanged since its index was written (None: unknown)


class _LoopThread:
    """An event loop on its own thread, so that synchronous archive readers can read an aiohttp body."""

    def __enter__(self) -> _LoopThread:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class _Bounded(io.RawIOBase):
    """An archive stream read within a total deadline and byte budget (the read timeout of a socket
    restarts with every byte; this does not). Seeks pass through, for a local zip."""

    def __init__(self, raw: BinaryIO, settings: FetchSettings) -> None:
        self.raw = raw
        self.settings = settings
        self.deadline = time.monotonic() + settings.archive_timeout_s
        self.count = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(getattr(self.raw, "seekable", lambda: False)())  # an S3 body may not say

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        if time.monotonic() > self.deadline:
            raise ArchiveUnavailable(
                "timeout", f"not read within download.archive_timeout_s = {self.settings.archive_timeout_s:g} s"
            )
        data = self.raw.read(len(buffer))
        self.count += len(data)
        if self.count > self.settings.max_archive_bytes:
            raise ArchiveUnavailable(
                "too_large", f"more than download.max_archive_bytes = {self.settings.max_archive_bytes} bytes"
            )
        buffer[: len(data)] = data
        return len(data)


def bounded(stream: BinaryIO, settings: FetchSettings) -> BinaryIO:
    return io.BufferedReader(_Bounded(stream, settings), 1 << 20)


class _BodyReader(io.RawIOBase):
    """An aiohttp response body as a blocking, read-only file."""

    def __init__(self, runner: _LoopThread, content) -> None:
        self._runner = runner
        self._content = content

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._runner.run(self._content.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)


def _classify(exc: BaseException) -> ArchiveUnavailable:
    """A manifest outcome for what went wrong opening or reading an archive by URL or from S3."""
    if isinstance(exc, ArchiveUnavailable):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return ArchiveUnavailable("tls_error", str(exc)[:300])
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, RefusedAddress):
        return ArchiveUnavailable("private_address", str(exc.os_error))
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError | aiohttp.SocketTimeoutError):
        return ArchiveUnavailable("timeout", str(exc) or "read timed out")
    if isinstance(exc, aiohttp.ClientPayloadError | EOFError | tarfile.ReadError):
        return ArchiveUnavailable("truncated", f"the archive ended early: {exc}")
    if isinstance(exc, zipfile.BadZipFile):
        return ArchiveUnavailable("not_archive", f"not a readable zip: {exc}")
    if isinstance(exc, aiohttp.ClientError | BotoCoreError):
        return ArchiveUnavailable("connection_error", f"{type(exc).__name__}: {exc}"[:300])
    return ArchiveUnavailable("read_error", f"{type(exc).__name__}: {exc}"[:300])


async def _get(session, url: str, settings: FetchSettings):
    """The final response for an archive URL: redirects followed by hand, each hop re-checked."""
    import ipaddress

    allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allow_networks]
    current = url
    for _hop in range(settings.max_redirects + 1):
        parts = urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ArchiveUnavailable("invalid_url", f"unsupported URL: {current[:200]}")
        if refusal := refused_host(current, allowed):
            raise ArchiveUnavailable(*refusal)
        response = await session.get(current, allow_redirects=False)
        if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
            current = urljoin(current, response.headers["Location"])
            response.release()
            continue
        if response.status != 200:
            response.release()
            raise ArchiveUnavailable(f"http_{response.status}", response.reason or "")
        robots = ",".join(response.headers.getall("X-Robots-Tag", [])).lower()
        if opted := sorted({t.strip() for t in re.split(r"[,:\s]+", robots)} & set(settings.robots_optout)):
            response.release()
            raise ArchiveUnavailable("robots_optout", f"X-Robots-Tag: {', '.join(opted)}")
        return response
    raise ArchiveUnavailable("too_many_redirects", f"more than {settings.max_redirects} redirects")


@contextlib.contextmanager
def open_url(url: str, settings: FetchSettings) -> Iterator[Opened]:
    """An archive by URL as a stream (TLS verified, private addresses refused, transient failures retried)."""
    with _LoopThread() as runner:
        session = runner.run(_async_session(Fetcher(settings)))
        try:
            rng = random.Random()
            for attempt in itertools.count():
                try:
                    response = runner.run(_get(session, url, settings))
                    break
                except STREAM_ERRORS as exc:
                    failure = _classify(exc)
                    transient = failure.status in ("timeout", "connection_error") or (
                        failure.status.startswith("http_") and int(failure.status[5:]) in TRANSIENT_HTTP
                    )
                    if not transient or attempt >= settings.retries:
                        raise failure from None
                    runner.run(asyncio.sleep(backoff_delay(attempt, settings.backoff_base_s, rng)))
            headers = response.headers
            identity = headers.get("ETag") or headers.get("Last-Modified")
            identity = f"{identity};{headers.get('Content-Length')}" if identity else None
            try:
                yield Opened(_BodyReader(runner, response.content), identity)  # buffered by bounded()
            finally:
                runner.run(_release(response))  # on the loop's own thread: aiohttp is not thread-safe
        finally:
            runner.run(session.close())


async def _async_session(fetcher):
    return fetcher.session()  # aiohttp wants its session made inside the loop that runs it


async def _release(response) -> None:
    response.release()


@contextlib.contextmanager
def open_s3(url: str, client) -> Iterator[Opened]:
    from botocore.exceptions import ClientError

    bucket, _, key = url[len("s3://") :].partition("/")
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        status = "http_404" if code in ("NoSuchKey", "404", "NoSuchBucket") else f"s3_{code}"
        raise ArchiveUnavailable(status, str(exc)[:300]) from None
    except BotoCoreError as exc:
        raise ArchiveUnavailable("connection_error", str(exc)[:300]) from None
    body = obj["Body"]
    try:
        yield Opened(body, f"{obj.get('ETag')};{obj.get('ContentLength')}")
    finally:
        body.close()


@contextlib.contextmanager
def open_local(path: str, source: str) -> Iterator[Opened]:
    file = Path(path)
    try:
        info = file.stat()
        fh = open(file, "rb")  # noqa: SIM115 (closed below, after the caller's reading)
    except FileNotFoundError:
        raise EaselError(f"{path}: archive not found (source {source!r})") from None
    except OSError as exc:
        raise EaselError(f"{path}: cannot be read (source {source!r}): {exc.strerror}") from None
    try:
        yield Opened(fh, f"{info.st_size};{info.st_mtime_ns}")
    finally:
        fh.close()


# -- one archive into the store -------------------------------------------------------------------


@dataclass
class ArchiveRows:
    """What one archive gave: per row its URL, its extra columns and its fetch record."""

    urls: list[str]
    extras: list[dict]
    records: list[dict]


def _failure_record(url: str, status: str, error: str) -> dict:
    return dict.fromkeys(RECORD_FIELDS) | {"url": url, "status": status, "error": error}


# What one damaged, encrypted or oddly compressed zip member raises; the others can still be read.
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError)


def _image_record(url: str, member: Member, store: ImageStore, max_bytes: int) -> dict:
    if member.size > max_bytes:
        return _failure_record(url, "too_large", f"member of {member.size} bytes > {max_bytes}")
    try:
        with member.open() as fh:
            data = read_at_most(fh, max_bytes + 1)
    except MEMBER_ERRORS as exc:
        # A damaged, encrypted or oddly compressed zip member; the other members can still be read.
        return _failure_record(url, "corrupt_member", f"{type(exc).__name__}: {exc}"[:300])
    if len(data) > max_bytes:
        return _failure_record(url, "too_large", f"member inflates past {max_bytes} bytes (declared {member.size})")
    image_type = sniff_image_type(data[:32])
    if image_type is None:
        return _failure_record(url, "not_image", "member bytes are not an image")
    return record_for(FetchResult(url, "ok", content=data, image_type=image_type), store)


def _caption(sidecars: dict[str, dict[str, bytes]], name: str) -> tuple[str | None, str | None]:
    """(caption, sidecar member) for an image member, from its stem's sidecars or its WebDataset key's."""
    for stem in dict.fromkeys((_stem(name), webdataset_key(name))):
        found = sidecars.get(stem, {})
        for suffix in CAPTION_SUFFIXES:
            if suffix not in found:
                continue
            text = found[suffix].decode("utf-8", errors="replace")
            if suffix == ".json":
                try:
                    meta = json.loads(text)
                except json.JSONDecodeError:
                    continue
                value = (meta.get("caption") or meta.get("text")) if isinstance(meta, dict) else None
                text = value if isinstance(value, str) else ""
            if text.strip():
                return text.strip(), stem + suffix
    return None, None


def _refusal(member: Member) -> str | None:
    problem = unsafe_name(member.name)
    if problem is None and member.kind == "link":
        problem = "a symbolic or hard link"
    if problem is None and member.kind == "special":
        problem = "a device, FIFO or other special file"
    return problem


def _archive_failure(exc: BaseException, archive: str) -> ArchiveUnavailable:
    """The outcome of an archive that cannot be opened or ends early."""
    text = str(exc)
    if isinstance(exc, tarfile.ReadError | zipfile.BadZipFile) and not (
        "unexpected end" in text or "truncated" in text.lower()
    ):
        return ArchiveUnavailable("not_archive", f"not a readable {Path(_path_part(archive)).name}: {text}")
    return _classify(exc)


def ingest_members(
    members: Iterator[Member], archive: str, store: ImageStore, max_bytes: int, pattern: str | None = None
) -> ArchiveRows:
    """Store every image member (matching `pattern`, if any); captions from sidecars are joined once the whole
    archive is read. Refused members are reported whatever their name.

    If the archive fails part-way, the rows read so far are kept and one row for the archive says why.
    """
    urls, names, records = [], [], []
    sidecars: dict[str, dict[str, bytes]] = {}
    seen: dict[str, int] = {}
    failure = None

    def add(member: Member, record: Callable[[str], dict]) -> None:
        # A row per member, even where two share a name (the second's URL ends #2): a refused link
        # never hides behind the file of the same name.
        seen[member.name] = seen.get(member.name, 0) + 1
        url = f"{archive}#{member.name}" + (f"#{seen[member.name]}" if seen[member.name] > 1 else "")
        row = record(url)  # first: a read that fails part-way leaves no half row
        urls.append(url)
        names.append(member.name)
        records.append(row)

    try:
        for member in members:
            if problem := _refusal(member):
                refused = f"member {member.name!r} refused: {problem}"
                add(member, lambda url, refused=refused: _failure_record(url, "unsafe_member", refused))
            elif member.kind != "file":
                continue
            elif _suffix(member.name) in IMAGE_SUFFIXES:
                if pattern is not None and not fnmatch.fnmatchcase(member.name, pattern):
                    continue
                add(member, lambda url, member=member: _image_record(url, member, store, max_bytes))
            elif _suffix(member.name) in CAPTION_SUFFIXES and member.size <= MAX_SIDECAR_BYTES:
                try:
                    with member.open() as fh:
                        text = read_at_most(fh, MAX_SIDECAR_BYTES)
                except MEMBER_ERRORS as exc:  # a damaged sidecar: its own row; the archive goes on
                    broken = f"{type(exc).__name__}: {exc}"[:300]
                    add(member, lambda url, broken=broken: _failure_record(url, "corrupt_member", broken))
                    continue
                sidecars.setdefault(_stem(member.name), {})[_suffix(member.name)] = text
    except STREAM_ERRORS as exc:  # a stream that fails part-way is an outcome, not a crash
        failure = _archive_failure(exc, archive)
    rows = ArchiveRows(urls, [], records)
    for name, record in zip(names, records, strict=True):
        caption, sidecar = _caption(sidecars, name) if record["status"] != "unsafe_member" else (None, None)
        rows.extras.append(
            {"archive": archive, "member": name, "key": webdataset_key(name), "caption": caption, "sidecar": sidecar}
        )
    if failure is not None:
        rows.urls.append(archive)
        rows.extras.append({"archive": archive})
        rows.records.append(_failure_record(archive, failure.status, str(failure)))
    return rows


def read_archive(
    opened: Opened, archive: str, store: ImageStore, max_bytes: int, scratch: Path, pattern: str | None = None
) -> ArchiveRows:
    """Every row of one opened archive; an archive that fails adds a row saying why after those read."""
    if not _path_part(archive).lower().endswith(".zip"):
        return ingest_members(tar_members(opened.stream), archive, store, max_bytes, pattern)
    try:
        with _seekable(opened.stream, scratch) as fh, zipfile.ZipFile(fh) as zipped:
            return ingest_members(zip_members(zipped), archive, store, max_bytes, pattern)
    except STREAM_ERRORS as exc:  # not a zip, or a body that broke while it was copied
        failure = _archive_failure(exc, archive)
        return ArchiveRows([archive], [{"archive": archive}], [_failure_record(archive, failure.status, str(failure))])


@contextlib.contextmanager
def _seekable(stream: BinaryIO, scratch: Path) -> Iterator[BinaryIO]:
    """A zip needs seeking (its index is at its end): a local file as it is, a remote body copied first."""
    if stream.seekable():
        yield stream
        return
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=scratch) as copy:  # no name: gone when closed, even after kill -9
            while chunk := stream.read(1 << 20):
                copy.write(chunk)
            copy.seek(0)
            yield copy
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()  # only if empty: another reader may be copying into it


# -- sources ---------------------------------------------------------------------------------------


@dataclass
class ArchiveReader:
    """Reads archive sources into the store, indexing each finished archive under out_dir/archives."""

    out_dir: Path
    settings: FetchSettings
    s3_client: object | None = None

    def _index_path(self, archive: str, pattern: str | None) -> Path:
        name = hashlib.sha256(f"{archive}#{pattern or ''}".encode()).hexdigest()[:32]
        return self.out_dir / "archives" / f"{name}.json"

    def _cached(self, archive: str, pattern: str | None, identity: str | None) -> ArchiveRows | None:
        path = self._index_path(archive, pattern)
        if identity is None or not path.is_file():
            return None
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a damaged index is re-made by reading the archive again
        if index.get("version") != INDEX_VERSION or index.get("identity") != self._identity(identity):
            return None
        rows = ArchiveRows(index["urls"], index["extras"], index["records"])
        if any(r["status"] == "ok" and not (self.out_dir / r["path"]).is_file() for r in rows.records):
            return None
        return rows

    def _identity(self, identity: str) -> str:
        return f"{identity};max_bytes={self.settings.max_bytes}"  # another size limit gives other outcomes

    @contextlib.contextmanager
    def _open(self, archive: str, source: str) -> Iterator[Opened]:
        if archive.startswith(("http://", "https://")):
            with open_url(archive, self.settings) as opened:
                yield opened
        elif archive.startswith("s3://"):
            if self.s3_client is None:
                raise EaselError(f"source {source!r}: s3:// archives need the storage settings")
            with open_s3(archive, self.s3_client) as opened:
                yield opened
        else:
            with open_local(archive, source) as opened:
                yield opened

    def read_one(self, archive: str, source: str, pattern: str | None = None) -> ArchiveRows:
        store = ImageStore(self.out_dir / "images")
        try:
            with self._open(archive, source) as opened:
                cached = self._cached(archive, pattern, opened.identity)
                if cached is not None:
                    return cached
                scratch = self.out_dir / "tmp"
                stream = Opened(bounded(opened.stream, self.settings), opened.identity)
                rows = read_archive(stream, archive, store, self.settings.max_bytes, scratch, pattern)
        except ArchiveUnavailable as exc:
            return ArchiveRows([archive], [{"archive": archive}], [_failure_record(archive, exc.status, str(exc))])
        complete = not (rows.urls and rows.urls[-1] == archive)  # no row for the archive itself: it was read whole
        if complete and opened.identity is not None:
            index = {"version": INDEX_VERSION, "identity": self._identity(opened.identity), **rows.__dict__}
            atomic_write_json(self._index_path(archive, pattern), index)
        return rows

    def read(self, spec: SourceParams, wanted: Callable[[str], bool] = lambda _a: True) -> tuple[pd.DataFrame, dict]:
        """One archive source (all its shards) as (inputs frame, records by URL), as a URL list gives them."""
        urls: list[str] = []
        extras: list[dict] = []
        records: dict[str, dict] = {}
        path, pattern = split_pattern(spec.path)
        for archive in expand_braces(_local_absolute(path), spec.name):
            rows = self.read_one(archive, spec.name, pattern) if wanted(archive) else None
            if rows is None:
                continue
            urls += rows.urls
            extras += rows.extras
            records.update({r["url"]: r for r in rows.records})
        table = pd.DataFrame(extras, columns=list(EXTRA_COLUMNS))
        return _frame(spec.name, urls, table), records


def _local_absolute(path: str) -> str:
    """Local archive paths as absolute paths: the manifest's URLs must not depend on the working folder."""
    if path.startswith(("http://", "https://", "s3://")):
        return path
    return os.path.abspath(path)
