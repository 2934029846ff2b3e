"""Files, safely: writes that never leave a half-written file or folder behind (temp path, fsync,
rename), stage tables read in chunks, files read in place inside archives, and paths from listings
kept inside their folder."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from components.plumbing.errors import EaselError


def writer_tag() -> str:
    """Who writes a temp file, in its name (`<pid>@<host>`): a run that removes what killed runs left
    behind (components/plumbing/scratch.py: remove_abandoned_temps) must not remove the temp file of a run
    that is still writing, a shard's beside it, say."""
    return f"{os.getpid()}@{socket.gethostname()}"


def temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, `.<name>.<pid>@<host>.XXXXXXXX.tmp`: (open descriptor, its path)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp")


def atomic_write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, data: Any) -> None:
    """Strict JSON (RFC 8259): a NaN or infinity is written as null, never as a bare NaN token."""
    from components.plumbing.numbers import strict_json

    atomic_write_text(path, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_write_parquet(path: Path | str, frame) -> None:
    """Write a pandas DataFrame as Parquet through a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ParquetRowGroups:
    """A Parquet file written a frame at a time, one row group each, to a temp file beside `path`
    that `finish` renames into place: memory holds one frame, and a failed run leaves the previous
    file. The first frame with rows fixes the schema unless `schema` is given."""

    def __init__(self, path: Path | str, schema=None) -> None:
        self.path, self.schema = Path(path), schema
        self.rows = 0
        self._writer = None
        self._tmp: Path | None = None
        self._empty = None  # the columns to write when no frame has rows

    def add(self, frame) -> None:
        import pyarrow as pa

        if frame.empty and self._writer is None:
            self._empty = frame
            return
        table = pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False)
        if self._writer is None:
            self._open(table.schema)
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def _open(self, schema) -> None:
        import pyarrow.parquet as pq

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(self.path)
        os.close(fd)
        self._tmp, self.schema = Path(tmp), schema
        self._writer = pq.ParquetWriter(tmp, schema)

    def finish(self) -> None:
        """Rename the file into place; with no rows, it still has the columns."""
        if self._writer is None:
            if self.schema is None:
                import pandas as pd

                atomic_write_parquet(self.path, self._empty if self._empty is not None else pd.DataFrame())
                return
            self._open(self.schema)
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


def read_stage_table(path: Path, stage: str, upstream: str, rows_are: str, required: tuple[str, ...] = ()):
    """A stage's Parquet input, or one EaselError saying what to do: run `upstream` (missing),
    the file is broken (unreadable, or lacks a column), or it holds no `rows_are` (empty)."""
    import pandas as pd

    with _reading_stage_input(path, stage, upstream):
        table = pd.read_parquet(path)
    _check_stage_input(path, stage, upstream, rows_are, required, list(table.columns), len(table))
    return table


def stage_table_chunks(
    path: Path,
    stage: str,
    upstream: str,
    rows_are: str | None,
    required: tuple[str, ...] = (),
    columns: list[str] | None = None,
    rows: int = 10_000,
) -> Iterator:
    """read_stage_table's table `rows` at a time (only `columns`, if given), so memory holds one
    chunk: an iterator of pandas frames. The same checks and errors, made at the call. With
    `rows_are` None an empty table is allowed: it gives one empty frame with the columns."""
    import pyarrow.parquet as pq

    with _reading_stage_input(path, stage, upstream):
        parquet = pq.ParquetFile(path)
    _check_stage_input(path, stage, upstream, rows_are, required, parquet.schema_arrow.names, parquet.metadata.num_rows)

    def chunks():
        with parquet:
            if not parquet.metadata.num_rows:
                yield parquet.schema_arrow.empty_table().select(columns or parquet.schema_arrow.names).to_pandas()
            batches = parquet.iter_batches(batch_size=rows, columns=columns)
            while True:
                with _reading_stage_input(path, stage, upstream):
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch.to_pandas()

    return chunks()


@contextlib.contextmanager
def _reading_stage_input(path: Path, stage: str, upstream: str) -> Iterator[None]:
    """A missing or unreadable stage input: one EaselError saying to run `upstream` (again)."""
    from components.plumbing.errors import EaselError

    if not path.is_file():
        raise EaselError(f"{stage}: {path} not found; run the {upstream} stage first")
    try:
        yield
    except (OSError, ValueError) as exc:
        raise EaselError(
            f"{stage}: {path}: cannot be read ({str(exc).splitlines()[0]}); rerun the {upstream} stage"
        ) from None


def _check_stage_input(
    path: Path,
    stage: str,
    upstream: str,
    rows_are: str | None,
    required: tuple[str, ...],
    columns: list[str],
    rows: int,
) -> None:
    from components.plumbing.errors import EaselError

    missing = [c for c in required if c not in columns]
    if missing:
        raise EaselError(f"{stage}: {path} lacks the column(s) {', '.join(missing)}; rerun the {upstream} stage")
    if not rows and rows_are is not None:
        raise EaselError(f"{stage}: {path} holds no {rows_are}; nothing to {stage}")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on error it vanishes.

    The old folder is moved aside before the new one takes its name, so `path` is always either
    the complete old output or the complete new one. What a killed earlier writing of `path` left
    beside it (its temp folder, a moved-aside old one: a whole model, say) is removed first.
    """
    from components.plumbing.scratch import abandoned_temp  # scratch -> procs -> this module

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if abandoned_temp(left):
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{writer_tag()}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArchivedFile:
    """A file read in place inside an uncompressed tar archive: where its bytes lie, and their
    sha256. Reading one creates no file (creating files costs more here than filling them)."""

    name: str  # the file's path in the archive
    archive: str
    offset: int
    size: int
    sha256: str

    def read(self) -> bytes:
        """The file's bytes, refused unless they have its sha256."""
        with open(self.archive, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            where = f"{self.size} bytes at {self.offset}"
            raise EaselError(f"{self.archive}: {self.name} ({where}) does not match its sha256; refused")
        return data


def read_archive_index(index: Path | str, folder: Path | str = ".") -> dict[str, ArchivedFile]:
    """Files read in place inside archives, from a JSON index {path: [archive, offset, size, sha256]}
    (what components.shard_exchange hands a shard), each archive inside `folder`; a malformed index
    is an error naming the file and the entry."""
    folder = Path(folder)
    try:
        entries = json.loads(Path(index).read_text(encoding="utf-8"))
    except OSError as exc:
        raise EaselError(f"{index}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise EaselError(f"{index}: not JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise EaselError(f"{index}: not an index of handed files ({{path: [archive, offset, size, sha256]}})")
    handed = {}
    for path, entry in entries.items():
        shape = [str, int, int, str]
        shaped = isinstance(entry, list) and [type(v) for v in entry] == shape
        if not (shaped and entry[1] >= 0 and entry[2] >= 0 and len(entry[3]) == 64):
            raise EaselError(f"{index}: {path}: not [archive, offset, size, sha256]; got {entry!r}")
        archive = inside_folder(folder, entry[0], f"{index}: {path}")
        handed[path] = ArchivedFile(path, str(archive), entry[1], entry[2], entry[3])
    return handed


def inside_folder(root: Path, rel: str, source: str) -> Path:
    """`root/rel` for a path read from a listing, refused if it would land outside `root`."""
    pure = PurePosixPath(rel)
    target = root.joinpath(*pure.parts)
    inside = not pure.is_absolute() and ".." not in pure.parts and bool(pure.parts)
    if not inside or not target.resolve().is_relative_to(root.resolve()):  # a symlinked folder on the way, too
        raise EaselError(f"{source}: path {rel!r} is not inside the folder; refused")
    return target


def dir_manifest(root: Path | str) -> list[dict]:
    """Every file under root (sorted, relative POSIX paths) with its size and sha256."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [
        {"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    ]


def manifest_digest(manifest: list[dict]) -> str:
    """One hash for a folder's content: changes when any file's path or bytes change."""
    digest = hashlib.sha256()
    for entry in sorted(manifest, key=lambda e: e["path"]):
        digest.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    return digest.hexdigest()


# Config keys that say where a model was loaded from, not what it is (transformers and diffusers write
# the source folder's path into a saved config): the same weights in another folder are the same model.
PATH_KEYS = frozenset({"_name_or_path"})
MODEL_CARD = "README.md"  # prose about the model, not the model


def _json_without_paths(path: Path) -> bytes | None:
    """A JSON file's content with the path keys dropped, canonically serialised; None if it is not a JSON object."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    kept = {k: v for k, v in data.items() if k not in PATH_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def model_fingerprint(folder: Path) -> str:
    """A model folder's identity: its weights and meaningful config, wherever the folder is.

    The digest of every file's relative path and content, except the model card, with each JSON
    config read without the keys that record a path (`_name_or_path`). Identical weights saved
    from two project folders have the same fingerprint (so the same registry version and
    leaderboard row); a changed weight, config value or tokenizer file changes it.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MODEL_CARD:
            continue
        canonical = _json_without_paths(path) if path.suffix == ".json" else None
        content = hashlib.sha256(canonical).hexdigest() if canonical is not None else sha256_file(path)
        digest.update(f"{relative}\0{content}\n".encode())
    return digest.hexdigest()
