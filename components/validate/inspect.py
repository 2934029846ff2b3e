"""Per-image metadata: the header alone for size, mode, DPI, ICC and EXIF; one decode for the rest.

The one decode verifies the whole stream (a truncated or corrupt file fails here) and gives the
perceptual hash for near-duplicate detection. JPEGs decode in draft mode at 1/8 scale: libjpeg
still reads every coefficient, so corruption is still caught, at a fraction of the cost.
Kept free of pandas so that worker processes start quickly.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from scipy.fft import dctn

from components.fsutil import atomic_write_json
from components.images import DEFAULT_MAX_PIXELS, dpi_from_info, open_guarded, to_8bit

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


def inspect_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Metadata of one image file; never raises for a bad file (the reasons go in the row)."""
    row = dict(EMPTY_ROW)
    try:
        image = open_guarded(path, max_pixels)
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


def _inspect_args(args: tuple[str, int]) -> dict:
    return inspect_image(*args)


@contextmanager
def inspection_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes for inspect_many, started once for a stage that inspects in chunks
    (None for one worker: inspect in this process)."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def inspect_many(paths: Sequence[str], max_pixels: int, pool: ProcessPoolExecutor | None = None) -> Iterator[dict]:
    """inspect_image over many files, in order, in the pool's processes when there are enough files."""
    jobs = [(p, max_pixels) for p in paths]
    if pool is None or len(jobs) < 64:
        yield from map(_inspect_args, jobs)
        return
    yield from pool.map(_inspect_args, jobs, chunksize=32)


# Bump when inspect_image's rows change: rows cached by an older version are then not read.
INSPECTION_VERSION = 1


class InspectionCache:
    """Inspection rows by the file's sha256 and the pixel limit they were read under, one JSON file
    each. The store is content-addressed, so a row stays true for its file; shards fill it
    (`easel validate --shard K/N`) and the stage reads it."""

    def __init__(self, root: Path | str, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        # Pillow decides what decodes: another version reads its own rows.
        self.root = Path(root) / f"v{INSPECTION_VERSION}-pillow{PIL.__version__}-max{max_pixels}px"

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.json"

    def get(self, sha256: str) -> dict | None:
        try:
            row = json.loads(self.path(sha256).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return row if isinstance(row, dict) and row.keys() == EMPTY_ROW.keys() else None

    def put(self, sha256: str, row: dict) -> None:
        atomic_write_json(self.path(sha256), row)


def inspect_cached(
    files: Sequence[tuple[str, str]],
    cache: InspectionCache,
    pool: ProcessPoolExecutor | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """{sha256: row} for (sha256, path) pairs: cached rows read, the others inspected and cached as they come."""
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
