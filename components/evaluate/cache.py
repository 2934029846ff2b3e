"""Generated images cached by (model, prompt, negative prompt, seed, generation settings).

The key is a hash of all of them, so an image is reused only when it would come out the same:
the production model's images are not regenerated on every evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from components.plumbing.fsutil import atomic_write_bytes


def image_key(model_id: str, prompt: str, negative: str, seed: int, settings_key: str) -> str:
    payload = json.dumps([model_id, prompt, negative, seed, settings_key], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class ImageCache:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, image: Image.Image) -> Path:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        atomic_write_bytes(self.path(key), buf.getvalue())
        return self.path(key)
