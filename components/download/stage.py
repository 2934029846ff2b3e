"""The download stage: read the sources, fetch what is missing, write the manifest and metrics.

Resumable: every finished URL is journaled as it completes (out_dir/journal/); a restarted run,
even after kill -9, skips URLs already fetched or finally failed and retries transient failures.
The manifest is rebuilt from the inputs and the journal on every run, so it is the same whether
the work was done in one run or several, by one process or many.

Scale: `workers` processes share the URLs on one machine. Across machines, `shard=(k, n)`
fetches only the URLs whose stable hash falls in shard k of n (write the manifest afterwards with
a run that has `write_manifest` and fetches nothing), so a Prefect flow can map shards over
workers that share the output folder.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from components.config import DownloadParams, StorageParams
from components.download.archives import split_sources
from components.download.fetch import TRANSIENT_STATUSES, FetchSettings
from components.download.journal import load_journal
from components.download.sources import read_sources
from components.download.store import ImageStore
from components.download.worker import RECORD_FIELDS, fetch_in_process, fetch_into, init_process
from components.errors import EaselError
from components.fsutil import atomic_write_json, atomic_write_parquet
from components.sharding import in_shard, share

log = logging.getLogger(__name__)

# Below this many URLs per process, an extra process costs more than it saves (measured: with 2,000
# URLs one process was faster than two; with 20,000, two were 1.5x faster; benchmarks/RESULTS.md).
MIN_URLS_PER_WORKER = 5000


def settings_from_params(params: DownloadParams) -> FetchSettings:
    return FetchSettings(
        concurrency=params.concurrency,
        per_host_concurrency=min(params.concurrency, params.per_host_concurrency),
        per_host_rate=params.per_host_rate,
        connect_timeout_s=params.connect_timeout_s,
        read_timeout_s=params.read_timeout_s,
        total_timeout_s=params.total_timeout_s,
        max_bytes=params.max_bytes,
        archive_timeout_s=params.archive_timeout_s,
        max_archive_bytes=params.max_archive_bytes,
        max_redirects=params.max_redirects,
        retries=params.retries,
        verify_tls=params.verify_tls,
        allow_networks=tuple(params.allow_networks),
        robots_optout=tuple(t.lower() for t in params.robots_optout),
        user_agent=params.user_agent,
    )


def _s3_access(storage: StorageParams):
    """S3 settings for the endpoint in use, and a lister of keys under a prefix."""
    from components.storage import ensure_bucket, make_client, resolve_settings, storage_errors

    settings = resolve_settings(storage)
    client = make_client(settings)

    def list_keys(bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        with storage_errors(settings, f"listing s3://{bucket}/{prefix}"):
            if not ensure_bucket(client, bucket, create=False):  # also checks that the endpoint is S3
                raise EaselError(f"source s3://{bucket}/{prefix}: the bucket {bucket} does not exist")
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(keys)

    return settings, list_keys


def is_done(record: dict | None, out_dir: Path) -> bool:
    """A journal record settles its URL unless it failed transiently or its file went missing."""
    if record is None or record.get("status") in TRANSIENT_STATUSES:
        return False
    return record["status"] != "ok" or (out_dir / record["path"]).is_file()


def build_manifest(inputs: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    """One manifest row per input row: the fetch record of its URL, or missing_url."""
    rows = []
    for url in inputs["url"]:
        if pd.isna(url):
            record = dict.fromkeys(RECORD_FIELDS) | {"status": "missing_url", "error": "empty URL cell"}
        else:
            record = records.get(url) or dict.fromkeys(RECORD_FIELDS) | {"url": url, "status": "not_fetched"}
        rows.append({f: record.get(f) for f in RECORD_FIELDS if f != "url"})
    fetched = pd.DataFrame(rows, index=inputs.index, columns=[f for f in RECORD_FIELDS if f != "url"])
    manifest = pd.concat([inputs, fetched], axis=1)
    for col in ("http_status", "bytes", "width", "height"):
        manifest[col] = manifest[col].astype("Int64")
    return manifest


def _fetch(out_dir: Path, urls: list[str], settings: FetchSettings, workers: int, progress: bool) -> None:
    bar = tqdm(total=len(urls), desc="download", unit="img", disable=not progress, smoothing=0.05)
    try:
        if workers <= 1:
            fetch_into(out_dir, urls, settings, on_done=lambda record: bar.update(1))
            return
        # Round-robin keeps shards even; each process has its own event loop and journal part.
        parts = [urls[i::workers] for i in range(workers)]
        context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        counter = context.Value("l", 0)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_process, initargs=(counter,)) as pool:
            futures = [pool.submit(fetch_in_process, str(out_dir), part, settings, i) for i, part in enumerate(parts)]
            while True:
                done, pending = wait(futures, timeout=0.5)
                bar.update(counter.value - bar.n)
                if not pending:
                    break
            for future in done:
                future.result()  # re-raise a worker's failure
    finally:
        bar.close()


def _with_archives(manifest: pd.DataFrame, params: DownloadParams, specs, s3_settings, shard) -> pd.DataFrame:
    """The manifest with the rows of the archive sources, every source's rows in params order.

    A shard run reads only its own archives; a run that writes the manifest reads every one (those already
    indexed cost nothing).
    """
    from components.download.archives import ArchiveReader

    client = None
    if s3_settings is not None:
        from components.storage import make_client

        client = make_client(s3_settings)
    reader = ArchiveReader(Path(params.out_dir), settings_from_params(params), client)

    def wanted(archive: str) -> bool:
        return in_shard(archive, shard)

    parts = [manifest]
    for spec in specs:
        inputs, records = reader.read(spec, wanted)
        if inputs.empty and not params.allow_empty and shard is None:
            raise EaselError(
                f"source {spec.name!r} ({spec.path}): no image members; fix the archive, remove the source from "
                "download.sources, or set download.allow_empty: true if that is expected"
            )
        parts.append(build_manifest(inputs, records))
    merged = pd.concat([p for p in parts if len(p)] or [manifest], ignore_index=True, sort=False)
    order = {s.name: i for i, s in enumerate(params.sources)}
    return merged.sort_values("source", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


@dataclass
class DownloadSummary:
    rows: int
    urls: int
    fetched_now: int
    statuses: dict[str, int]
    unique_images: int
    manifest: Path | None
    seconds: float

    def table(self) -> str:
        width = max((len(s) for s in self.statuses), default=7)
        lines = [f"{'outcome':<{width}}  rows", f"{'-' * width}  ----"]
        lines += [f"{status:<{width}}  {count:>4}" for status, count in sorted(self.statuses.items())]
        lines.append(
            f"{self.rows} rows, {self.urls} distinct URLs, {self.unique_images} distinct images; "
            f"fetched {self.fetched_now} now in {self.seconds:.1f} s"
        )
        return "\n".join(lines)


def run_download(
    params: DownloadParams,
    metrics_path: Path | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    write_manifest: bool = True,
    storage: StorageParams | None = None,
) -> DownloadSummary:
    """Fetch what is missing and write the manifest. `storage` is needed for s3:// sources."""
    started = time.perf_counter()
    out_dir = Path(params.out_dir)
    s3_settings = None
    list_keys = None
    if any(s.path.startswith("s3://") for s in params.sources):
        if storage is None:
            raise EaselError("download: s3:// sources need the storage settings")
        s3_settings, list_keys = _s3_access(storage)
    url_sources, archive_sources = split_sources(params.sources)
    inputs = (
        read_sources(url_sources, list_keys, params.allow_empty)
        if url_sources
        else pd.DataFrame(columns=["source", "row", "url"])
    )
    ImageStore(out_dir / "images").remove_partials()
    records = load_journal(out_dir / "journal")
    wanted = list(dict.fromkeys(u for u in inputs["url"] if pd.notna(u)))
    todo = [u for u in share(wanted, shard, key=str) if not is_done(records.get(u), out_dir)]
    workers = max(1, min(params.workers, len(todo) // MIN_URLS_PER_WORKER))
    log.info("%d rows, %d distinct URLs, %d to fetch with %d worker(s)", len(inputs), len(wanted), len(todo), workers)
    if todo:
        settings = dataclasses.replace(settings_from_params(params), s3=s3_settings)
        _fetch(out_dir, todo, settings, workers, progress)
        records = load_journal(out_dir / "journal")
    manifest = build_manifest(inputs, records)
    if archive_sources:  # read member by member into the same store; rows like those of fetched URLs
        manifest = _with_archives(manifest, params, archive_sources, s3_settings, None if write_manifest else shard)
    statuses = dict(Counter(manifest["status"]))
    ok = manifest[manifest["status"] == "ok"]
    summary = DownloadSummary(
        rows=len(manifest),
        urls=len(wanted),
        fetched_now=len(todo),
        statuses=statuses,
        unique_images=int(ok["sha256"].nunique()),
        manifest=out_dir / "manifest.parquet" if write_manifest else None,
        seconds=time.perf_counter() - started,
    )
    if not write_manifest:
        return summary
    if statuses.get("not_fetched"):
        raise EaselError(
            f"download: {statuses['not_fetched']} URLs have not been fetched by any shard yet; "
            "run every shard before writing the manifest"
        )
    atomic_write_parquet(out_dir / "manifest.parquet", manifest)
    if metrics_path is not None:
        atomic_write_json(
            metrics_path,
            {
                "rows": summary.rows,
                "distinct_urls": summary.urls,
                "distinct_images": summary.unique_images,
                "ok_rows": statuses.get("ok", 0),
                # rows whose image is byte-identical to an earlier row's (stored once)
                "duplicate_rows": int(len(ok) - ok["sha256"].nunique()),
                "outcomes": dict(sorted(statuses.items())),
            },
        )
    return summary
