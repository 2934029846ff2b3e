"""Small builders shared by the tests."""

import hashlib
import io
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def make_download_dir(root, files: dict[str, bytes]):
    rows = []
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        rel = f"images/{sha[:2]}/{sha}{name[name.rfind('.') :]}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        rows.append(
            {
                "source": "t",
                "row": len(rows),
                "url": f"http://h/{name}",
                "status": "ok",
                "sha256": sha,
                "path": rel,
                "bytes": len(data),
            }
        )
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    return root


def make_caption_dir(root, files: dict[str, bytes], captions: list[str]):
    """A download dir of `files` and a caption dir whose captions.parquet gives them `captions`."""
    download = make_download_dir(root / "download", files)
    manifest = pd.read_parquet(download / "manifest.parquet")
    caption_dir = root / "caption"
    caption_dir.mkdir()
    pd.DataFrame(
        {"sha256": manifest["sha256"], "image_path": [str(download / p) for p in manifest["path"]], "caption": captions}
    ).to_parquet(caption_dir / "captions.parquet")
    return caption_dir


def accepted_set(root, count: int = 4, size=(96, 80)):
    """A download dir + validate dir whose accepted.parquet lists `count` distinct noise images."""
    files = {f"img{i}.png": encode(noise(*size, seed=100 + i), "PNG", dpi=(96, 96)) for i in range(count)}
    download = make_download_dir(root / "download", files)
    manifest = pd.read_parquet(download / "manifest.parquet")
    validate = root / "validate"
    validate.mkdir(parents=True, exist_ok=True)
    manifest["image_path"] = [str(download / p) for p in manifest["path"]]
    manifest[["sha256", "path", "image_path", "url", "source"]].to_parquet(validate / "accepted.parquet")
    return download, validate


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1, valid one day, made by the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
