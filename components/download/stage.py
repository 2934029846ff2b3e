"""The download stage: read the sources, fetch what is missing, write the manifest and metrics.

Resumable: every finished URL is appended to `journal.jsonl` as it completes; a restarted run
(even after kill -9) skips URLs already fetched or finally failed, and retries transient
failures. The manifest is rebuilt from the inputs and the journal each run, so it is the same
whether the work was done in one run or several.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from components.config import DownloadParams
from components.download.fetch import TRANSIENT_STATUSES, Fetcher, FetchResult, FetchSettings
from components.download.sources import read_sources
from components.download.store import ImageStore
from components.fsutil import atomic_write_json, atomic_write_parquet
from components.images import read_header

log = logging.getLogger(__name__)

RECORD_FIELDS = (
    "url",
    "status",
    "error",
    "http_status",
    "final_url",
    "sha256",
    "bytes",
    "path",
    "image_type",
    "width",
    "height",
)


class Journal:
    """An append-only JSONL record of finished URLs; a torn last line (kill -9) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None
        self._since_sync = 0

    def load(self) -> dict[str, dict]:
        records: dict[str, dict] = {}
        if not self.path.is_file():
            return records
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "url" in record:
                    records[record["url"]] = record
        return records

    def append(self, record: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open across appends)
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        self._since_sync += 1
        if self._since_sync >= 64:
            self.sync()

    def sync(self) -> None:
        if self._fh is not None:
            os.fsync(self._fh.fileno())
            self._since_sync = 0

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None


def settings_from_params(params: DownloadParams) -> FetchSettings:
    return FetchSettings(
        concurrency=params.concurrency,
        per_host_concurrency=min(params.concurrency, params.per_host_concurrency),
        per_host_rate=params.per_host_rate,
        connect_timeout_s=params.connect_timeout_s,
        read_timeout_s=params.read_timeout_s,
        total_timeout_s=params.total_timeout_s,
        max_bytes=params.max_bytes,
        max_redirects=params.max_redirects,
        retries=params.retries,
        verify_tls=params.verify_tls,
        allow_networks=tuple(params.allow_networks),
        robots_optout=tuple(t.lower() for t in params.robots_optout),
        user_agent=params.user_agent,
    )


def is_done(record: dict | None, out_dir: Path) -> bool:
    """A journal record settles its URL unless it failed transiently or its file went missing."""
    if record is None or record.get("status") in TRANSIENT_STATUSES:
        return False
    return record["status"] != "ok" or (out_dir / record["path"]).is_file()


def record_for(result: FetchResult, store: ImageStore) -> dict:
    record = {f: None for f in RECORD_FIELDS}
    record.update(
        url=result.url,
        status=result.status,
        error=result.error,
        http_status=result.http_status,
        final_url=result.final_url,
    )
    if result.status != "ok":
        return record
    header = read_header(result.content)
    if header.error:
        status = "decompression_bomb" if header.error.startswith("decompression_bomb") else "not_image"
        record.update(status=status, error=header.error[:300])
        return record
    sha, rel = store.put(result.content, result.image_type)
    record.update(
        sha256=sha,
        bytes=len(result.content),
        path=f"images/{rel}",
        image_type=result.image_type,
        width=header.width,
        height=header.height,
    )
    return record


@dataclass
class DownloadSummary:
    rows: int
    urls: int
    fetched_now: int
    statuses: dict[str, int]
    unique_images: int
    manifest: Path

    def table(self) -> str:
        width = max(len(s) for s in self.statuses) if self.statuses else 6
        lines = [f"{'outcome':<{width}}  rows", f"{'-' * width}  ----"]
        lines += [f"{status:<{width}}  {count:>4}" for status, count in sorted(self.statuses.items())]
        lines.append(f"{self.rows} rows, {self.urls} distinct URLs, {self.unique_images} distinct images")
        return "\n".join(lines)


async def _fetch_missing(urls: list[str], settings: FetchSettings, store: ImageStore, journal: Journal, progress: bool):
    bar = tqdm(total=len(urls), desc="download", unit="url", disable=not progress, smoothing=0.1)

    def on_result(result: FetchResult) -> None:
        journal.append(record_for(result, store))
        bar.update(1)
        bar.set_postfix_str(result.status, refresh=False)

    try:
        await Fetcher(settings).run(urls, on_result)
    finally:
        bar.close()
        journal.close()


def build_manifest(inputs: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    """One manifest row per input row: the fetch record of its URL, or missing_url."""
    rows = []
    for url in inputs["url"]:
        if pd.isna(url):
            record = {f: None for f in RECORD_FIELDS} | {"status": "missing_url", "error": "empty URL cell"}
        else:
            record = records.get(url) or {f: None for f in RECORD_FIELDS} | {
                "url": url,
                "status": "not_fetched",
            }
        rows.append({f: record.get(f) for f in RECORD_FIELDS if f != "url"})
    fetched = pd.DataFrame(rows, index=inputs.index)
    manifest = pd.concat([inputs, fetched], axis=1)
    for col in ("http_status", "bytes", "width", "height"):
        manifest[col] = manifest[col].astype("Int64")
    return manifest


def run_download(params: DownloadParams, metrics_path: Path | None = None, progress: bool = True) -> DownloadSummary:
    out_dir = Path(params.out_dir)
    inputs = read_sources(params.sources)
    store = ImageStore(out_dir / "images")
    store.remove_partials()
    journal = Journal(out_dir / "journal.jsonl")
    records = journal.load()
    wanted = list(dict.fromkeys(u for u in inputs["url"] if pd.notna(u)))
    todo = [u for u in wanted if not is_done(records.get(u), out_dir)]
    log.info("%d rows, %d distinct URLs, %d to fetch", len(inputs), len(wanted), len(todo))
    if todo:
        asyncio.run(_fetch_missing(todo, settings_from_params(params), store, journal, progress))
        records = journal.load()
    manifest = build_manifest(inputs, records)
    atomic_write_parquet(out_dir / "manifest.parquet", manifest)
    statuses = dict(Counter(manifest["status"]))
    summary = DownloadSummary(
        rows=len(manifest),
        urls=len(wanted),
        fetched_now=len(todo),
        statuses=statuses,
        unique_images=int(manifest.loc[manifest["status"] == "ok", "sha256"].nunique()),
        manifest=out_dir / "manifest.parquet",
    )
    if metrics_path is not None:
        atomic_write_json(
            metrics_path,
            {
                "rows": summary.rows,
                "distinct_urls": summary.urls,
                "distinct_images": summary.unique_images,
                "ok_rows": statuses.get("ok", 0),
                "outcomes": dict(sorted(statuses.items())),
            },
        )
    return summary
