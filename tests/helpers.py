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


# -- evaluations, as the evaluate stage writes them, for the gate -----------------------------------


def write_prompts(path, n: int = 12, categories: tuple[str, ...] = ("poster", "ad", "product")):
    rows = [
        f"p{i:02d},a {categories[i % len(categories)]} of thing {i},basic,{categories[i % len(categories)]}"
        for i in range(n)
    ]
    path.write_text("id,prompt,negative_prompt,category\n" + "\n".join(rows) + "\n")
    return path


def evaluation_scores(
    prompt_ids: list[str],
    seeds=(0, 1),
    references=("base",),
    aesthetic=6.2,
    aesthetic_diff=0.05,
    clip=0.28,
    clip_diff=0.005,
    noise=0.01,
    rng_seed=0,
) -> pd.DataFrame:
    """scores.csv rows: the candidate, and each reference scoring `*_diff` lower, with a little noise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for model in ("candidate", *references):
        for prompt_id in prompt_ids:
            for seed in seeds:
                lower = 0.0 if model == "candidate" else 1.0
                rows.append(
                    {
                        "model": model,
                        "prompt_id": prompt_id,
                        "category": "poster",
                        "seed": seed,
                        "prompt": f"prompt {prompt_id}",
                        "negative_prompt": "",
                        "aesthetic_score": aesthetic - lower * aesthetic_diff + rng.normal(0, noise),
                        "clip_score": clip - lower * clip_diff + rng.normal(0, noise / 5),
                        "image": f"images/{model}/{prompt_id}__seed{seed}.png",
                    }
                )
    return pd.DataFrame(rows)


def write_evaluation(
    folder,
    model_dir,
    prompts_path,
    scores: pd.DataFrame | None = None,
    production_version=None,
    bootstrap=(0.95, 2000, 0),
    **score_kw,
):
    """summary.json + scores.csv as the evaluate stage writes them (same statistics code, same bindings)."""
    import hashlib
    import json

    from components.evaluate.stats import score_summary
    from components.plumbing.fsutil import model_fingerprint, sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    if scores is None:
        ids = pd.read_csv(prompts_path, dtype=str)["id"].tolist()
        references = ("production", "base") if production_version else ("base",)
        scores = evaluation_scores(ids, references=references, **score_kw)
    data = scores.to_csv(index=False).encode()
    (folder / "scores.csv").write_bytes(data)
    others = [m for m in dict.fromkeys(scores["model"]) if m != "candidate"]
    summary = score_summary(scores, others, *bootstrap) | {
        "model_fingerprint": model_fingerprint(model_dir),
        "production_version": production_version,
        "prompt_set_sha256": sha256_file(prompts_path),
        "scores_sha256": hashlib.sha256(data).hexdigest(),
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def make_model(folder, content: bytes = b"weights"):
    """A folder the gate and the registry take for a diffusers pipeline (they read, not load, it)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(content)
    return folder


def tiny_evaluate_params(tmp_path, prompts, **overrides):
    """Evaluate settings for the tiny models: 64 px, few steps, a small bootstrap, files under tmp_path."""
    from components.config import EvaluateParams

    settings = {
        "out_dir": str(tmp_path / "eval"),
        "prompts": str(prompts),
        "seeds": [0, 1],
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        "leaderboard": str(tmp_path / "leaderboard.csv"),
        "scorer_workers": 0,
        "bootstrap": {"resamples": 500, "confidence": 0.95, "seed": 0},
    }
    return EvaluateParams(**(settings | overrides))


def put_in_production(s3_settings, bucket: str, model_dir, name: str = "posters"):
    """Publish `model_dir` to the registry in `bucket` and point production at it, as a promote would."""
    from components.plumbing.fsutil import model_fingerprint
    from components.release.registry import Registry
    from components.storage import ensure_bucket, make_client

    client = make_client(s3_settings)
    ensure_bucket(client, bucket)
    registry = Registry(client, s3_settings, bucket, "registry")
    manifest = registry.publish(name, model_dir, {}, {"model_fingerprint": model_fingerprint(model_dir)})
    registry.set_alias(name, "production", manifest["version"], "the model in production")
    return registry, manifest["version"]


def sdxl_gate_params(**overrides):
    """The sdxl profile's gate thresholds, as the gate and registry tests use them."""
    from components.config import GateParams

    settings = {
        "min_aesthetic_mean": 6.0,
        "min_clip_score_mean": 0.25,
        "aesthetic_floor": 5.0,
        "max_share_below_floor": 0.2,
        "margins": {"aesthetic": 0.05, "clip_score": 0.01},
    }
    return GateParams(**(settings | overrides))


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1, valid one day, made by the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class _Payload:
    """What an attacker plants: unpickling it makes the folder `ran` (a harmless, visible effect)."""

    def __init__(self, ran: Path) -> None:
        self.ran = str(ran)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.ran,))


def pickle_payload(ran: Path) -> bytes:
    """Pickle bytes that, if anything ever unpickles them (pickle.load, torch.load with
    weights_only=False), create the folder `ran`."""
    import pickle

    return pickle.dumps({"state": _Payload(ran)})
