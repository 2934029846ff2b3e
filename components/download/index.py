"""The download stage's working index on disk: the URLs the sources ask for and what the journal
says about each, in a SQLite file, so that memory does not grow with the number of URLs.

The sources and the journal are read in chunks into it; the stage then asks it which URLs are
still to fetch (in order, or in a shard's share), and for the records of one chunk of input rows
at a time while the manifest is written.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from components.sharding import Shard, stable_hash

BATCH = 5000  # rows per executemany / lookup: big enough to amortise, small enough to bound memory
SIGNED = 2**63  # SQLite integers are signed 64-bit: the hash is shifted to keep its order


class UrlIndex:
    """`wanted`: distinct URLs in first-seen order with their stable hash; `records`: the journal's
    latest record per URL. Lives in `path` (a scratch file the caller removes)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        # A scratch index, rebuilt from the journal on every run: no durability needed.
        self.db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -32768;
            CREATE TABLE wanted (seq INTEGER PRIMARY KEY, url TEXT UNIQUE NOT NULL, hash INTEGER NOT NULL);
            CREATE TABLE records (url TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
            CREATE TABLE images (sha256 TEXT PRIMARY KEY) WITHOUT ROWID;
            """
        )

    def close(self) -> None:
        self.db.close()

    def add_urls(self, urls: Iterable[str]) -> None:
        """Record distinct URLs in the order first seen (repeats are ignored)."""
        rows = ((url, stable_hash(url) - SIGNED) for url in urls)
        self.db.executemany("INSERT OR IGNORE INTO wanted (url, hash) VALUES (?, ?)", rows)

    def url_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM wanted").fetchone()[0]

    def load_journal(self, folder: Path) -> None:
        """(Re)read the journal's parts; a URL in several parts keeps the latest record, as
        components/download/journal.py defines."""
        from components.download.journal import iter_journal

        self.db.execute("DELETE FROM records")
        batch: list[tuple[str, str]] = []
        for record in iter_journal(folder):
            batch.append((record["url"], json.dumps(record)))
            if len(batch) >= BATCH:
                self.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?)", batch)
                batch.clear()
        self.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?)", batch)

    def wanted_with_records(self, shard: Shard | None = None) -> Iterator[tuple[str, dict | None]]:
        """(url, its journal record or None) for every wanted URL, or for shard K of N's share:
        every N-th URL in the order of their stable hash (components/sharding.py: `share`)."""
        order = "w.hash, w.seq" if shard is not None else "w.seq"
        query = f"SELECT w.url, r.record FROM wanted w LEFT JOIN records r USING (url) ORDER BY {order}"
        cursor = self.db.execute(query)
        for position, (url, record) in enumerate(cursor):
            if shard is None or position % shard[1] == shard[0]:
                yield url, (json.loads(record) if record is not None else None)

    def records_for(self, urls: list[str]) -> dict[str, dict]:
        """The journal records of these URLs (those that have one)."""
        found: dict[str, dict] = {}
        distinct = list(dict.fromkeys(urls))
        for start in range(0, len(distinct), 500):  # SQLite's bound-parameter limit is far above 500
            part = distinct[start : start + 500]
            marks = ",".join("?" * len(part))
            for url, record in self.db.execute(f"SELECT url, record FROM records WHERE url IN ({marks})", part):
                found[url] = json.loads(record)
        return found

    def note_images(self, sha256s: Iterable[str]) -> None:
        """Count these images (by content hash) among the distinct ones."""
        self.db.executemany("INSERT OR IGNORE INTO images VALUES (?)", ((sha,) for sha in sha256s))

    def distinct_images(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
