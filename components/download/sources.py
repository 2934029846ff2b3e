"""Read URL lists: CSV, TSV, JSON, JSONL and Parquet (gzip allowed), one named source each.

Every input row is kept (with its row number and extra columns such as title or caption), so the
manifest can account for each one, including rows with no URL at all.
"""

from __future__ import annotations

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


def read_source(spec: SourceParams) -> pd.DataFrame:
    """One source as a frame: source, row, url (joined; None when empty), then its other columns."""
    path = Path(spec.path)
    table = read_table(path)
    if spec.url_column not in table.columns:
        raise EaselError(
            f"{path}: no column {spec.url_column!r} (source {spec.name!r}); "
            f"columns are: {', '.join(map(str, table.columns))}"
        )
    urls = [join_url(v, spec.url_prefix) for v in table[spec.url_column].tolist()]
    extras = table.drop(columns=[spec.url_column]).astype("string")
    extras.columns = [f"src_{c}" for c in extras.columns]
    frame = pd.DataFrame({"source": spec.name, "row": range(len(table)), "url": urls})
    return pd.concat([frame, extras.reset_index(drop=True)], axis=1)


def read_sources(specs: list[SourceParams]) -> pd.DataFrame:
    frames = [read_source(spec) for spec in specs]
    return pd.concat(frames, ignore_index=True, sort=False)
