"""Training-ready copies of accepted images that need it; the raw store is never touched.

An image needs a copy when its EXIF orientation is not upright or its colour mode is not plain
RGB or greyscale (CMYK, palette, alpha, 16-bit, ...). The copy is RGB, orientation applied, and
lossless PNG, named by the original's sha256.
"""

from __future__ import annotations

import io
from pathlib import Path

from components.images import open_guarded, to_rgb
from components.plumbing.fsutil import atomic_write_bytes

PLAIN_MODES = ("RGB", "L")


def needs_copy(mode: str | None, exif_orientation: int | None) -> bool:
    return (exif_orientation not in (None, 1)) or (mode not in PLAIN_MODES)


def write_training_copy(source: Path, target: Path, max_pixels: int) -> Path:
    if target.is_file():  # named by content: an existing copy is this copy
        return target
    with open_guarded(source, max_pixels) as image:
        rgb = to_rgb(image)
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    atomic_write_bytes(target, buf.getvalue())
    return target
