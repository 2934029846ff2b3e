"""Read sources: URL lists (CSV, TSV, JSON, JSONL, Parquet; gzip allowed), local folders and
s3:// prefixes, one named source each.

Every input row is kept (with its row number and extra columns such as title or caption), so the
manifest can account for each one, including rows with no URL at all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from components.config import SourceParams
from components.errors import EaselError

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


def read_table(path: Path) -> pd.DataFrame:
    fmt = source_format(path)
    try:
        if fmt == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if fmt == "tsv":
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        if fmt == "json":
            return pd.read_json(path, orient="records", dtype=False)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
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


def _frame(name: str, urls: list, extras: pd.DataFrame) -> pd.DataFrame:
    extras = extras.astype("string")
    extras.columns = [f"src_{c}" for c in extras.columns]
    frame = pd.DataFrame({"source": name, "row": range(len(urls)), "url": urls})
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


def read_source(spec: SourceParams, list_keys: Callable[[str, str], list[str]] | None = None) -> pd.DataFrame:
    """One source as a frame: source, row, url (joined; None when empty), then its other columns.

    A source is a URL list file, a local folder of images, or an s3://bucket/prefix.
    """
    if spec.path.startswith("s3://"):
        return read_s3_prefix(spec, list_keys)
    path = Path(spec.path)
    if path.is_dir():
        return read_folder(spec)
    table = read_table(path)
    if spec.url_column not in table.columns:
        raise EaselError(
            f"{path}: no column {spec.url_column!r} (source {spec.name!r}); "
            f"columns are: {', '.join(map(str, table.columns))}"
        )
    urls = [join_url(v, spec.url_prefix) for v in table[spec.url_column].tolist()]
    return _frame(spec.name, urls, table.drop(columns=[spec.url_column]))


def read_sources(
    specs: list[SourceParams], list_keys: Callable[[str, str], list[str]] | None = None, allow_empty: bool = False
) -> pd.DataFrame:
    """Every source's rows. A source with no rows, or no URL in any row, is an error unless
    `allow_empty` (download.allow_empty) says that is expected: an empty list is far more often a
    broken export than a wish to train on nothing, and it would replace the last good manifest."""
    frames = []
    for spec in specs:
        frame = read_source(spec, list_keys)
        if not allow_empty and (frame.empty or frame["url"].isna().all()):
            what = "no rows" if frame.empty else f"no URL in any of its {len(frame)} rows ({spec.url_column!r})"
            kind = "folder" if Path(spec.path).is_dir() else "prefix" if spec.path.startswith("s3://") else "list"
            raise EaselError(
                f"source {spec.name!r} ({spec.path}): {what}; fix the {kind}, remove the source from "
                "download.sources, or set download.allow_empty: true if that is expected"
            )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True, sort=False)
