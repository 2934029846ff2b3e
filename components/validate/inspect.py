"""Per-image metadata: the header alone for size, mode, DPI, ICC and EXIF; one decode for the rest.

The one decode verifies the whole stream (a truncated or corrupt file fails here) and gives the
perceptual hash for near-duplicate detection. JPEGs decode in draft mode at 1/8 scale: libjpeg
still reads every coefficient, so corruption is still caught, at a fraction of the cost.
Kept free of pandas so that worker processes start quickly.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image
from scipy.fft import dctn

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


def inspect_many(
    paths: Sequence[str],
    max_pixels: int,
    workers: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """inspect_image over many files, in `workers` processes when there are enough files."""
    jobs = [(p, max_pixels) for p in paths]
    if workers <= 1 or len(jobs) < 64:
        rows = []
        for job in jobs:
            rows.append(_inspect_args(job))
            if on_progress:
                on_progress(1)
        return rows
    context = multiprocessing.get_context("spawn")
    rows = []
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for row in pool.map(_inspect_args, jobs, chunksize=32):
            rows.append(row)
            if on_progress:
                on_progress(1)
    return rows
