"""A content-addressed image store: files are named by the sha256 of their bytes.

Names come from the content, never from the URL, so no path can escape the store, and the same
image fetched from two URLs is stored once. Writes go to a temp file first and are renamed into
place, so a killed run never leaves a partial file under a real name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from components.plumbing.fsutil import writer_tag

EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "gif": "gif",
    "webp": "webp",
    "tiff": "tif",
    "bmp": "bmp",
    "avif": "avif",
}


class ImageStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def relpath(self, sha256: str, image_type: str) -> str:
        return f"{sha256[:2]}/{sha256}.{EXTENSIONS.get(image_type, 'bin')}"

    def put(self, data: bytes, image_type: str) -> tuple[str, str]:
        """Store bytes; returns (sha256, path relative to the store root). Idempotent."""
        sha = hashlib.sha256(data).hexdigest()
        rel = self.relpath(sha, image_type)
        target = self.root / rel
        if target.is_file() and target.stat().st_size == len(data):
            return sha, rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid and host in the name: a run cleaning up after a killed one must not
        # delete the partial files of a run that is still writing (another shard, say).
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{writer_tag()}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha, rel
