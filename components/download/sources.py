"""Read sources: URL lists (CSV, TSV, JSON, JSONL, Parquet; gzip allowed), local folders and
s3:// prefixes, one named source each.

Every input row is kept (with its row number and extra columns such as title or caption), so the
manifest can account for each one, including rows with no URL at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from components.config import SourceParams
from components.plumbing.errors import EaselError

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


def source_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in FORMATS:
        raise EaselError(f"{path}: unknown URL list format (use one of {', '.join(sorted(FORMATS))}, optionally .gz)")
    return FORMATS[suffixes[-1]]


CHUNK_ROWS = 10_000  # input rows read at a time: memory stays flat however long the list is (~3 KB each in flight)


def table_chunks(path: Path, rows: int | None = None) -> Iterator[pd.DataFrame]:
    """The list's rows, `rows` (default CHUNK_ROWS) at a time. CSV, TSV, JSONL and Parquet are read
    a chunk at a time; a JSON array has to be parsed whole (use JSONL for long lists)."""
    fmt = source_format(path)
    rows = rows or CHUNK_ROWS
    try:
        if fmt in ("csv", "tsv"):
            sep = "\t" if fmt == "tsv" else ","
            with pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, chunksize=rows) as reader:
                yield from reader
        elif fmt == "jsonl":
            with pd.read_json(path, lines=True, dtype=False, chunksize=rows) as reader:
                yield from reader
        elif fmt == "json":
            table = pd.read_json(path, orient="records", dtype=False)
            for start in range(0, max(len(table), 1), rows):
                yield table.iloc[start : start + rows]
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as parquet:
                batches = parquet.iter_batches(batch_size=rows)
                first = next(batches, None)
                if first is None:  # no row group at all: the columns still count
                    yield parquet.schema_arrow.empty_table().to_pandas()
                    return
                yield first.to_pandas()
                for batch in batches:
                    yield batch.to_pandas()
    except FileNotFoundError:
        raise EaselError(f"{path}: URL list not found") from None
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise EaselError(f"{path}: cannot be read as {fmt}: {exc}") from None


def join_url(value: object, prefix: str | None) -> str | None:
    """The absolute URL for a cell: absolute URLs pass through; relative ones join the prefix."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    if not text:
        return None
    if "://" in text or not prefix:
        return text
    return prefix.rstrip("/") + "/" + text.lstrip("/")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}


def _frame(name: str, urls: list, extras: pd.DataFrame, first_row: int = 0) -> pd.DataFrame:
    extras = extras.astype("string")
    extras.columns = [f"src_{c}" for c in extras.columns]
    frame = pd.DataFrame({"source": name, "row": range(first_row, first_row + len(urls)), "url": urls})
    return pd.concat([frame, extras.reset_index(drop=True)], axis=1)


def read_folder(spec: SourceParams) -> pd.DataFrame:
    """A local folder as a source: every image file below it (by suffix), as a file:// URL."""
    root = Path(spec.path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    rel = [p.relative_to(root).as_posix() for p in files]
    return _frame(spec.name, [p.as_uri() for p in files], pd.DataFrame({"file": rel}))


def read_s3_prefix(spec: SourceParams, list_keys: Callable[[str, str], list[str]] | None) -> pd.DataFrame:
    """An s3://bucket/prefix source: every image object under the prefix."""
    if list_keys is None:
        raise EaselError(f"source {spec.name!r}: s3:// sources need the storage settings (run through `easel`)")
    bucket, _, prefix = spec.path[len("s3://") :].partition("/")
    keys = [k for k in list_keys(bucket, prefix) if Path(k).suffix.lower() in IMAGE_SUFFIXES]
    return _frame(spec.name, [f"s3://{bucket}/{k}" for k in keys], pd.DataFrame({"key": keys}))


def source_chunks(
    spec: SourceParams, list_keys: Callable[[str, str], list[str]] | None = None, rows: int | None = None
) -> Iterator[pd.DataFrame]:
    """One source's rows, a chunk at a time: source, row, url (joined; None when empty), then its
    other columns as src_<name>. A source is a URL list file, a local folder of images, or an
    s3://bucket/prefix (the last two are listed whole: a listing is names, not rows of data)."""
    if spec.path.startswith("s3://"):
        yield read_s3_prefix(spec, list_keys)
        return
    path = Path(spec.path)
    if path.is_dir():
        yield read_folder(spec)
        return
    first_row = 0
    for table in table_chunks(path, rows):
        if spec.url_column not in table.columns:
            raise EaselError(
                f"{path}: no column {spec.url_column!r} (source {spec.name!r}); "
                f"columns are: {', '.join(map(str, table.columns))}"
            )
        urls = [join_url(v, spec.url_prefix) for v in table[spec.url_column].tolist()]
        yield _frame(spec.name, urls, table.drop(columns=[spec.url_column]), first_row)
        first_row += len(table)


def read_source(spec: SourceParams, list_keys: Callable[[str, str], list[str]] | None = None) -> pd.DataFrame:
    """One source as one frame (`source_chunks` joined)."""
    return pd.concat(list(source_chunks(spec, list_keys)), ignore_index=True)


def refuse_empty(spec: SourceParams, rows: int, url_rows: int) -> None:
    """A source with no rows, or no URL in any row, is an error unless `download.allow_empty` says
    that is expected: an empty list is far more often a broken export than a wish to train on
    nothing, and it would replace the last good manifest."""
    if rows and url_rows:
        return
    what = "no rows" if not rows else f"no URL in any of its {rows} rows ({spec.url_column!r})"
    kind = "folder" if Path(spec.path).is_dir() else "prefix" if spec.path.startswith("s3://") else "list"
    raise EaselError(
        f"source {spec.name!r} ({spec.path}): {what}; fix the {kind}, remove the source from "
        "download.sources, or set download.allow_empty: true if that is expected"
    )
