"""Per-image metadata: the header alone for size, mode, DPI, ICC and EXIF; one decode for the rest.

The one decode verifies the whole stream (a truncated or corrupt file fails here) and gives the
perceptual hash for near-duplicate detection. JPEGs decode in draft mode at 1/8 scale: libjpeg
still reads every coefficient, so corruption is still caught, at a fraction of the cost.
Kept free of pandas so that worker processes start quickly.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from scipy.fft import dctn

from components.images import DEFAULT_MAX_PIXELS, dpi_from_info, open_guarded, to_8bit
from components.plumbing.fsutil import ArchivedFile
from components.plumbing.numbers import strict_json

EXIF_ORIENTATION = 0x0112
HASH_SIZE = 8  # a 64-bit pHash


def phash(image: Image.Image) -> str:
    """The DCT perceptual hash (as in pHash/imagehash) of an image, as 16 hex digits."""
    image = to_8bit(image)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if image.width > 256 or image.height > 256:  # a cheap box reduction first
        image = image.reduce(max(1, min(image.width, image.height) // 64))
    small = image.convert("L").resize((4 * HASH_SIZE, 4 * HASH_SIZE), Image.BOX)
    low = dctn(np.asarray(small, dtype=np.float32), norm="ortho")[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).flatten()
    return np.packbits(bits).tobytes().hex()


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


EMPTY_ROW = {
    "format": None,
    "mode": None,
    "width": None,
    "height": None,
    "dpi": None,
    "icc_profile": False,
    "exif_orientation": None,
    "animated": False,
    "header_read": False,
    "decodable": False,
    "decode_error": None,
    "phash": None,
}


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, from the header only. (Pillow's PNG getexif() decodes the whole
    image to look for a late eXIf chunk; a PNG's EXIF counts only if it precedes the pixels.)"""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    return image.getexif().get(EXIF_ORIENTATION)


def inspect_image(source: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Metadata of one image (its path, or its bytes); never raises for a bad image (the reasons go in the row)."""
    row = dict(EMPTY_ROW)
    try:
        image = open_guarded(source, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        row["decode_error"] = f"decompression_bomb: {exc}"
        return row
    except (OSError, SyntaxError, ValueError) as exc:
        row["decode_error"] = f"unreadable header: {type(exc).__name__}: {exc}"
        return row
    with image:
        row.update(
            format=image.format,
            mode=image.mode,
            width=image.width,
            height=image.height,
            dpi=dpi_from_info(image.info),
            icc_profile=bool(image.info.get("icc_profile")),
            header_read=True,
        )
        try:
            row["exif_orientation"] = exif_orientation(image)
            row["animated"] = bool(getattr(image, "is_animated", False))
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            row["phash"] = phash(image)
            row["decodable"] = True
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            row["decode_error"] = f"decompression_bomb: {exc}"
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            row["decode_error"] = f"{type(exc).__name__}: {exc}"
    return row


def _inspect_args(args: tuple[str | ArchivedFile, int]) -> dict:
    source, max_pixels = args
    # Bytes that do not match their sha256 are not the file the table names: raised, not a row.
    return inspect_image(source.read() if isinstance(source, ArchivedFile) else source, max_pixels)


@contextmanager
def inspection_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes for inspect_many, started once for a stage that inspects in chunks
    (None for one worker: inspect in this process)."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def inspect_many(
    sources: Sequence[str | ArchivedFile], max_pixels: int, pool: ProcessPoolExecutor | None = None
) -> Iterator[dict]:
    """inspect_image over many files (paths, or files read inside an archive), in order, in the
    pool's processes when there are enough files."""
    jobs = [(source, max_pixels) for source in sources]
    if pool is None or len(jobs) < 64:
        yield from map(_inspect_args, jobs)
        return
    yield from pool.map(_inspect_args, jobs, chunksize=32)


# Bump when inspect_image's rows change (or how they are stored): rows of an older version are not read.
INSPECTION_VERSION = 2
PART_SUFFIX = ".sqlite"
COMMIT_ROWS = 256  # a killed run loses at most this many inspections


class InspectionCache:
    """Inspection rows by the file's sha256 and the pixel limit they were read under, in SQLite
    files ("parts") in one folder. A cache that writes adds one part of its own, committed every
    COMMIT_ROWS rows (a killed run keeps what it committed), and every part is read: a shard
    (`easel validate --shard K/N`) hands its part back whole, one file, and the stage finds its
    rows there. One file per row cost more to create than to fill (benchmarks/RESULTS.md). The
    store is content-addressed, so a row stays true for its file; a part that cannot be read is
    skipped (its files are inspected again). Use it as a context manager: leaving commits."""

    def __init__(self, root: Path | str, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        # Pillow decides what decodes: another version reads its own rows.
        self.root = Path(root) / f"v{INSPECTION_VERSION}-pillow{PIL.__version__}-max{max_pixels}px"
        self._parts: list[sqlite3.Connection] | None = None
        self._writer: sqlite3.Connection | None = None
        self._uncommitted = 0

    def __enter__(self) -> InspectionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readers(self) -> list[sqlite3.Connection]:
        if self._parts is None:
            self._parts = [db for path in sorted(self.root.glob(f"*{PART_SUFFIX}")) if (db := _open_part(path))]
        return self._parts + ([self._writer] if self._writer else [])

    def get(self, sha256: str) -> dict | None:
        for db in self._readers():
            try:
                found = db.execute("SELECT row FROM rows WHERE sha256 = ?", (sha256,)).fetchone()
                row = json.loads(found[0]) if found else None
            except (sqlite3.DatabaseError, ValueError):
                continue
            if isinstance(row, dict) and row.keys() == EMPTY_ROW.keys():
                return row
        return None

    def put(self, sha256: str, row: dict) -> None:
        if self._writer is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._writer = sqlite3.connect(self.root / f"{uuid.uuid4().hex}{PART_SUFFIX}")
            self._writer.execute(PART_TABLE)
        self._writer.execute("INSERT OR REPLACE INTO rows VALUES (?, ?)", (sha256, json.dumps(strict_json(row))))
        self._uncommitted += 1
        if self._uncommitted >= COMMIT_ROWS:
            self.commit()

    def commit(self) -> None:
        if self._writer is not None:
            self._writer.commit()
        self._uncommitted = 0

    def close(self) -> None:
        self.commit()
        for db in (self._parts or []) + ([self._writer] if self._writer else []):
            db.close()
        self._parts, self._writer = None, None

    def compact(self) -> int:
        """Fold every part into one (a new file, renamed into place, then the old ones deleted), so
        that lookups and hand-outs stay one file as runs add parts; returns the parts folded."""
        self.close()
        parts = sorted(self.root.glob(f"*{PART_SUFFIX}"))
        if len(parts) < 2:
            return 0
        target = self.root / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        tmp = target.with_suffix(".tmp")
        try:
            with contextlib.closing(sqlite3.connect(tmp)) as db:
                db.execute(PART_TABLE)
                for path in parts:
                    if part := _open_part(path):
                        with contextlib.closing(part):
                            rows = part.execute("SELECT sha256, row FROM rows")
                            db.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?)", rows)
                db.commit()
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        for path in parts:
            path.unlink(missing_ok=True)
            path.with_name(path.name + "-journal").unlink(missing_ok=True)
        return len(parts)


PART_TABLE = "CREATE TABLE IF NOT EXISTS rows (sha256 TEXT PRIMARY KEY, row TEXT NOT NULL) WITHOUT ROWID"


def _open_part(path: Path) -> sqlite3.Connection | None:
    """A part, read only; None if it is not a readable part."""
    if path.with_name(path.name + "-journal").exists():
        # A writer killed mid-commit leaves a "hot" journal, which a read-only reader cannot roll
        # back; one read-write read does (a live writer's journal is not hot, and is left alone).
        with contextlib.suppress(sqlite3.DatabaseError), contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("SELECT 1 FROM rows LIMIT 1")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return None
    try:
        db.execute("SELECT sha256, row FROM rows LIMIT 1")
    except sqlite3.DatabaseError:
        db.close()
        return None
    return db


def inspect_cached(
    files: Sequence[tuple[str, str | ArchivedFile]],
    cache: InspectionCache,
    pool: ProcessPoolExecutor | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """{sha256: row} for (sha256, path or archived file) pairs: cached rows read, the others
    inspected and cached as they come."""
    rows = {sha: cache.get(sha) for sha, _ in files}
    todo = [(sha, path) for sha, path in files if rows[sha] is None]
    if on_progress and len(files) > len(todo):
        on_progress(len(files) - len(todo))
    for (sha, _), row in zip(todo, inspect_many([p for _, p in todo], cache.max_pixels, pool), strict=True):
        cache.put(sha, row)
        rows[sha] = row
        if on_progress:
            on_progress(1)
    return rows
