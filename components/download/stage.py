"""The download stage: read the sources, fetch what is missing, write the manifest and metrics.

Resumable: every finished URL is journaled as it completes (out_dir/journal/); a restarted run,
even after kill -9, skips URLs already fetched or finally failed and retries transient failures.
The manifest is rebuilt from the inputs and the journal on every run, so it is the same whether
the work was done in one run or several, by one process or many.

Memory stays flat as the lists grow: the sources are read a chunk at a time into a SQLite index on
disk (components/download/index.py) with the journal, the URLs to fetch go to a file the workers
read as they go, and the manifest is written row group by row group.

Scale: `workers` processes share the URLs on one machine. Across machines, `shard=(k, n)`
fetches only the URLs whose stable hash falls in shard k of n (write the manifest afterwards with
a run that has `write_manifest` and fetches nothing), so a Prefect flow can map shards over
workers that share the output folder.
"""

from __future__ import annotations

import dataclasses
import json
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
from components.download.index import UrlIndex
from components.download.sources import refuse_empty, source_chunks
from components.download.worker import RECORD_FIELDS, fetch_in_process, fetch_into, init_process, read_url_file
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import ParquetRowGroups, atomic_write_json
from components.plumbing.scratch import ScratchDir, remove_abandoned_temps
from components.sharding import in_shard

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


INT_FIELDS = ("http_status", "bytes", "width", "height")  # nullable integers in the manifest


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
    for col in INT_FIELDS:
        manifest[col] = manifest[col].astype("Int64")
    return manifest


def manifest_schema(columns: list[str]):
    """The manifest's Parquet schema: row and the fetch record's counts are integers (nullable),
    everything else text."""
    import pyarrow as pa

    return pa.schema([(c, pa.int64() if c == "row" or c in INT_FIELDS else pa.string()) for c in columns])


class ManifestPass:
    """Goes over the manifest's rows a chunk at a time: counts outcomes and distinct images and,
    with `path`, writes the chunks as Parquet row groups (components.plumbing.fsutil.ParquetRowGroups: a
    failed run leaves the previous manifest)."""

    def __init__(self, columns: list[str], index: UrlIndex, path: Path | None) -> None:
        self.columns, self.index = columns, index
        self.statuses: Counter[str] = Counter()
        self.rows = 0
        self._out = ParquetRowGroups(path, manifest_schema(columns)) if path is not None else None

    def add(self, chunk: pd.DataFrame) -> None:
        chunk = chunk.reindex(columns=self.columns)
        self.rows += len(chunk)
        self.statuses.update(chunk["status"].tolist())
        self.index.note_images(chunk.loc[chunk["status"] == "ok", "sha256"].tolist())
        if self._out is None:
            return
        for col in self.columns:
            if col not in ("row", *INT_FIELDS):
                chunk[col] = chunk[col].astype("string")
        self._out.add(chunk)

    def finish(self) -> None:
        if self._out is not None:
            self._out.finish()

    def abandon(self) -> None:
        if self._out is not None:
            self._out.abandon()


def _fetch(out_dir: Path, todo_file: Path, count: int, settings: FetchSettings, workers: int, progress: bool) -> None:
    bar = tqdm(total=count, desc="download", unit="img", disable=not progress, smoothing=0.05)
    try:
        if workers <= 1:
            fetch_into(out_dir, read_url_file(todo_file), settings, on_done=lambda record: bar.update(1))
            return
        # Each process has its own event loop and journal part, and reads every workers-th URL of the file.
        context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        counter = context.Value("l", 0)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_process, initargs=(counter,)) as pool:
            futures = [
                pool.submit(fetch_in_process, str(out_dir), str(todo_file), part, workers, settings)
                for part in range(workers)
            ]
            while True:
                done, pending = wait(futures, timeout=0.5)
                bar.update(counter.value - bar.n)
                if not pending:
                    break
            for future in done:
                future.result()  # re-raise a worker's failure
    finally:
        bar.close()


def _index_sources(index: UrlIndex, specs, list_keys, allow_empty: bool) -> list[str]:
    """Read every URL source into the index, chunk by chunk; the src_ columns met, in order."""
    columns: dict[str, None] = {}
    for spec in specs:
        rows = url_rows = 0
        for chunk in source_chunks(spec, list_keys):
            columns.update(dict.fromkeys(c for c in chunk.columns if c.startswith("src_")))
            urls = chunk["url"].dropna().tolist()
            index.add_urls(urls)
            rows, url_rows = rows + len(chunk), url_rows + len(urls)
        if not allow_empty:
            refuse_empty(spec, rows, url_rows)
    return list(columns)


def _write_todo(index: UrlIndex, shard, out_dir: Path, path: Path) -> int:
    """The URLs of this run (or shard) not settled yet, one per line in `path`; how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for url, record in index.wanted_with_records(shard):
            if not is_done(record, out_dir):
                fh.write(json.dumps(url) + "\n")
                count += 1
    return count


def _archive_manifests(params: DownloadParams, specs, s3_settings, shard) -> dict[str, pd.DataFrame]:
    """Each archive source's manifest rows, by source name (archives are indexed member by member
    into the same store; their rows are like those of fetched URLs).

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

    manifests = {}
    for spec in specs:
        inputs, records = reader.read(spec, wanted)
        if inputs.empty and not params.allow_empty and shard is None:
            raise EaselError(
                f"source {spec.name!r} ({spec.path}): no image members; fix the archive, remove the source from "
                "download.sources, or set download.allow_empty: true if that is expected"
            )
        manifests[spec.name] = build_manifest(inputs, records)
    return manifests


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
    # DVC keeps this folder between runs: what killed runs left half-written in it (an image, the
    # manifest, an archive's index) goes now, before DVC would keep it with the folder.
    remove_abandoned_temps(out_dir, depth=3)
    with ScratchDir("download") as scratch:
        index = UrlIndex(scratch / "index.sqlite")
        try:
            src_columns = _index_sources(index, url_sources, list_keys, params.allow_empty)
            index.load_journal(out_dir / "journal")
            todo_file = scratch / "todo.jsonl"
            todo = _write_todo(index, shard, out_dir, todo_file)
            workers = max(1, min(params.workers, todo // MIN_URLS_PER_WORKER))
            urls = index.url_count()
            log.info("%d distinct URLs, %d to fetch with %d worker(s)", urls, todo, workers)
            if todo:
                settings = dataclasses.replace(settings_from_params(params), s3=s3_settings)
                _fetch(out_dir, todo_file, todo, settings, workers, progress)
                index.load_journal(out_dir / "journal")
            archives = {}
            if archive_sources:
                archives = _archive_manifests(params, archive_sources, s3_settings, None if write_manifest else shard)
            columns = ["source", "row", "url", *src_columns, *(f for f in RECORD_FIELDS if f != "url")]
            for frame in archives.values():
                columns += [c for c in frame.columns if c not in columns]
            manifest_path = out_dir / "manifest.parquet"
            rows = ManifestPass(columns, index, manifest_path if write_manifest else None)
            try:
                for spec in params.sources:  # every source's rows, in params order
                    if spec.name in archives:
                        rows.add(archives[spec.name])
                        continue
                    for chunk in source_chunks(spec, list_keys):
                        rows.add(build_manifest(chunk, index.records_for(chunk["url"].dropna().tolist())))
                statuses = dict(rows.statuses)
                if write_manifest and statuses.get("not_fetched"):
                    raise EaselError(
                        f"download: {statuses['not_fetched']} URLs have not been fetched by any shard yet; "
                        "run every shard before writing the manifest"
                    )
                rows.finish()
            except BaseException:
                rows.abandon()
                raise
            unique_images = index.distinct_images()
        finally:
            index.close()
    ok_rows = statuses.get("ok", 0)
    summary = DownloadSummary(
        rows=rows.rows,
        urls=urls,
        fetched_now=todo,
        statuses=statuses,
        unique_images=unique_images,
        manifest=manifest_path if write_manifest else None,
        seconds=time.perf_counter() - started,
    )
    if write_manifest and metrics_path is not None:
        atomic_write_json(
            metrics_path,
            {
                "rows": summary.rows,
                "distinct_urls": summary.urls,
                "distinct_images": summary.unique_images,
                "ok_rows": ok_rows,
                # rows whose image is byte-identical to an earlier row's (stored once)
                "duplicate_rows": int(ok_rows - unique_images),
                "outcomes": dict(sorted(statuses.items())),
            },
        )
    return summary
