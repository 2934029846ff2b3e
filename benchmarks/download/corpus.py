"""A benchmark corpus: N real-size JPEG/PNG images (50-500 KB) cut from scikit-image's photographs."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def _photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def build_corpus(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` distinct images (idempotent: existing files are kept). Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    photos = None
    rng = random.Random(seed)
    for i in range(count):
        # Draw every parameter even when the file exists, so file i is the same whatever `count` is.
        photo_index = rng.randrange(len(PHOTOS))
        scale = rng.uniform(0.8, 2.2)
        is_png = rng.random() < 0.15
        quality = rng.randint(80, 95)
        box_frac = (rng.random(), rng.random())
        path = folder / f"{i:06d}.{'png' if is_png else 'jpg'}"
        paths.append(path)
        if path.exists():
            continue
        photos = photos or _photos()
        photo = photos[photo_index]
        width = min(photo.width, max(200, round(photo.width / scale)))
        height = min(photo.height, max(200, round(photo.height / scale)))
        left = round((photo.width - width) * box_frac[0])
        top = round((photo.height - height) * box_frac[1])
        crop = photo.crop((left, top, left + width, top + height))
        if is_png:
            crop = crop.resize((max(200, width * 2 // 3), max(200, height * 2 // 3)))
        target = crop.resize((min(1000, crop.width * 2), min(1000, crop.height * 2))) if crop.width < 400 else crop
        buf = io.BytesIO()
        target.save(buf, "PNG" if is_png else "JPEG", **({} if is_png else {"quality": quality}))
        path.write_bytes(buf.getvalue())
    return paths
