"""One download worker: fetch a list of URLs into the store and journal each outcome.

Kept free of pandas and the rest of the stage, so that worker processes start quickly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from components.download.fetch import Fetcher, FetchResult, FetchSettings
from components.download.journal import JournalWriter
from components.download.store import ImageStore
from components.images import read_header
from components.sharding import new_part_name

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


def record_for(result: FetchResult, store: ImageStore) -> dict:
    """The journal record of a fetch; an image is stored only once its header parses."""
    record = dict.fromkeys(RECORD_FIELDS)
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


def fetch_into(
    out_dir: Path,
    urls: Iterable[str],
    settings: FetchSettings,
    shard: int = 0,
    on_done: Callable[[dict], None] | None = None,
) -> int:
    """Fetch `urls` (any iterable: read as needed), storing images under out_dir/images and
    journaling under out_dir/journal; how many were fetched."""
    store = ImageStore(out_dir / "images")
    journal = JournalWriter(out_dir / "journal", new_part_name(shard))

    # Hashing and writing inline: measured, a helper thread cost more CPU (GIL hand-offs) than it saved.
    done = 0

    def on_result(result: FetchResult) -> None:
        nonlocal done
        record = record_for(result, store)
        journal.append(record)
        done += 1
        if on_done is not None:
            on_done(record)

    try:
        asyncio.run(Fetcher(settings).run(urls, on_result))
    finally:
        journal.close()
    return done


# -- process pool entry points (spawned processes: module-level functions and globals) -------------

_progress = None


def init_process(counter) -> None:
    global _progress
    _progress = counter


def _count(_record: dict) -> None:
    with _progress.get_lock():
        _progress.value += 1


def read_url_file(path: Path, part: int = 0, parts: int = 1) -> Iterator[str]:
    """The URLs of a to-do file, one JSON string per line (written by the stage: a URL may hold any
    character), read as they are needed: every `parts`-th line from line `part` (round robin keeps
    the processes' shares even)."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if number % parts == part:
                yield json.loads(line)


def fetch_in_process(out_dir: str, todo_file: str, part: int, parts: int, settings: FetchSettings) -> int:
    urls = read_url_file(Path(todo_file), part, parts)
    return fetch_into(Path(out_dir), urls, settings, part, _count if _progress is not None else None)
