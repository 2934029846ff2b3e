"""Image reading shared by the stages: header-only metadata, a verified decode, RGB loading.

Pillow's `Image.open` reads only the header (size, mode, DPI); pixels are decoded on `load()`.
A decompression bomb (a huge declared size) is refused before any decoding.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 40_000_000


@dataclass
class ImageHeader:
    format: str | None
    width: int | None
    height: int | None
    mode: str | None
    dpi: float | None
    error: str | None = None  # why the header could not be read


def _dpi(info: dict) -> float | None:
    dpi = info.get("dpi")
    if not dpi:
        return None
    try:
        values = [float(v) for v in (dpi if isinstance(dpi, tuple | list) else (dpi, dpi))]
    except (TypeError, ValueError):
        return None
    # Both axes must clear the floor, so the smaller one is the image's DPI; 0 means "not set".
    smallest = min(values)
    # One decimal absorbs unit round trips (PNG stores px/metre: 96 dpi reads back as 95.99 or 96.01).
    return round(smallest, 1) if smallest > 0 else None


def _open(source: Path | bytes, max_pixels: int) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = max_pixels
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(fp)


def read_header(source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Format, size, mode and DPI from the header alone; `error` says why if unreadable."""
    try:
        with _open(source, max_pixels) as im:
            return ImageHeader(im.format, im.width, im.height, im.mode, _dpi(im.info))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageHeader(None, None, None, None, None, f"decompression_bomb: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:
        return ImageHeader(None, None, None, None, None, f"unreadable header: {exc}")


def verify_decode(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Decode the whole stream once (JPEG at 1/8 scale, still every byte); None if it decodes."""
    try:
        with _open(path, max_pixels) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"decompression_bomb: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def load_rgb(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB with EXIF orientation applied (for captioning and training)."""
    with _open(Path(path), max_pixels) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


def thumbnail(path: Path | str, size: int = 160) -> Image.Image | None:
    """A small RGB preview, or None for files that do not decode (reports show a placeholder)."""
    try:
        im = load_rgb(path)
    except Exception:
        return None
    im.thumbnail((size, size))
    return im
