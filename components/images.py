"""Image reading shared by the stages: header-only metadata, a verified decode, RGB loading.

Pillow's `Image.open` reads only the header (size, mode, DPI); pixels are decoded on `load()`.
A decompression bomb (a huge declared size) is refused before any decoding.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def dpi_from_info(info: dict) -> float | None:
    """DPI as Pillow reports it (JFIF, PNG pHYs and TIFF units converted to inches); None if unset."""
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


def open_guarded(source: Path | str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image.open with a decompression-bomb limit: a bigger declared size raises before decoding."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(fp)


def read_header(source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Format, size, mode and DPI from the header alone; `error` says why if unreadable."""
    try:
        with open_guarded(source, max_pixels) as im:
            return ImageHeader(im.format, im.width, im.height, im.mode, dpi_from_info(im.info))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageHeader(None, None, None, None, None, f"decompression_bomb: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:
        return ImageHeader(None, None, None, None, None, f"unreadable header: {exc}")


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """16- or 32-bit integer images scaled to 8-bit L (Pillow's own conversion clips them)."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    array = np.asarray(image, dtype=np.float32)
    return Image.fromarray((255 * array / max(float(array.max()), 1.0)).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Training-ready RGB: EXIF orientation applied; transparency flattened on white; 16-bit scaled;
    CMYK converted through its embedded ICC profile when it has one."""
    image = to_8bit(ImageOps.exif_transpose(image))
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to Pillow's plain conversion
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to training-ready RGB (see to_rgb), for captioning, training and scoring."""
    with open_guarded(Path(path), max_pixels) as im:
        return to_rgb(im)


def thumbnail(path: Path | str, size: int = 160) -> Image.Image | None:
    """A small RGB preview, or None for files that do not decode (reports show a placeholder)."""
    try:
        im = load_rgb(path)
    except Exception:
        return None
    im.thumbnail((size, size))
    return im
