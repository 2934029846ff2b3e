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


def build_corpus(folder: Path, count: int, seed: int = 0, min_kb: int = 50, max_kb: int = 500) -> list[Path]:
    """Write `count` distinct images of min_kb-max_kb KB (idempotent: existing files are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    photos = None
    rng = random.Random(seed)
    for i in range(count):
        # Draw every parameter even when the file exists, so file i is the same whatever `count` is.
        photo_index = rng.randrange(len(PHOTOS))
        side = rng.randint(500, 1000)
        aspect = rng.uniform(0.6, 1.5)
        is_png = rng.random() < 0.15
        quality = rng.randint(80, 95)
        box_frac = (rng.random(), rng.random())
        path = folder / f"{i:06d}.{'png' if is_png else 'jpg'}"
        paths.append(path)
        if path.exists():
            continue
        photos = photos or _photos()
        photo = photos[photo_index]
        # A random crop, resized so its long side is `side` px: posters and ads come in all shapes.
        crop_w = max(64, round(photo.width * rng.uniform(0.4, 1.0)))
        crop_h = max(64, min(photo.height, round(crop_w * aspect)))
        left = round((photo.width - crop_w) * box_frac[0])
        top = round((photo.height - crop_h) * box_frac[1])
        crop = photo.crop((left, top, left + crop_w, top + crop_h))
        scale = side / max(crop.size)
        image = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
        data = _encode(image, is_png, quality)
        # Nudge the size into [min_kb, max_kb]: shrink big files, raise quality (or size) of small ones.
        for _ in range(12):
            kb = len(data) / 1024
            if kb > max_kb:
                image = image.resize((round(image.width * 0.85), round(image.height * 0.85)))
            elif kb < min_kb:
                if is_png or quality >= 98:
                    image = image.resize((round(image.width * 1.15), round(image.height * 1.15)))
                else:
                    quality = min(98, quality + 4)
            else:
                break
            data = _encode(image, is_png, quality)
        path.write_bytes(data)
    return paths


def _encode(image: Image.Image, is_png: bool, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG" if is_png else "JPEG", **({} if is_png else {"quality": quality}))
    return buf.getvalue()
