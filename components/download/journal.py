"""The download journal: append-only JSON lines, one per finished URL, in one file per writer.

Each run (and each worker process within it) appends to its own part file, named so that parts
sort in the order they were written: when a URL appears in several parts, the latest wins.
A torn last line, as kill -9 can leave, is skipped on reading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

SYNC_EVERY = 64


def iter_journal(folder: Path) -> Iterator[dict]:
    """Every record in write order (parts in name order, lines in file order): where a URL appears
    more than once, the last one read is its current record."""
    if not folder.is_dir():
        return
    for part in sorted(folder.glob("*.jsonl")):
        with open(part, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "url" in record:
                    yield record


class JournalWriter:
    def __init__(self, folder: Path, part_name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(folder / part_name, "a", encoding="utf-8")  # noqa: SIM115 (kept open across appends)
        self._since_sync = 0

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        self._since_sync += 1
        if self._since_sync >= SYNC_EVERY:
            os.fsync(self._fh.fileno())
            self._since_sync = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
