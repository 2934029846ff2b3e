"""Loading models by hub id or local path: the same code for the real models and the tiny ones.

A reference that names an existing local path loads from disk; anything else goes to the hub
through `from_pretrained`. A reference into the tiny model folder that does not exist yet is
built first (it is Easel's own deterministic build), so `dvc repro` works from a fresh clone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config import ModelsParams
from components.errors import EaselError

log = logging.getLogger(__name__)

TINY_ROOT = Path(".easel/models/tiny")
CACHE_DIR = Path(os.environ.get("EASEL_CACHE", Path.home() / ".cache" / "easel"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_for(precision: str) -> torch.dtype:
    return {"no": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _is_tiny_ref(ref: Path) -> bool:
    try:
        ref.resolve().relative_to(TINY_ROOT.resolve())
        return True
    except ValueError:
        return False


def resolve_ref(ref: str, what: str) -> str:
    """A local path (made absolute, built if it is a tiny model) or a hub id, unchanged."""
    path = Path(ref)
    if path.exists():
        return str(path.resolve())
    if _is_tiny_ref(path):
        from components.models.tiny import build_tiny_models

        log.info("building the tiny offline model set in %s", TINY_ROOT)
        build_tiny_models(TINY_ROOT)
        if path.exists():
            return str(path.resolve())
    if ref.startswith((".", "/")) or ref.count("/") > 1:
        raise EaselError(f"params.yaml: models.{what}: {ref!r} is neither an existing path nor a hub id")
    return ref


def hub_kwargs(models: ModelsParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if models.revision:
        kwargs["revision"] = models.revision
    if models.variant:
        kwargs["variant"] = models.variant
    return kwargs


def _hub_error(what: str, ref: str, exc: Exception) -> EaselError:
    return EaselError(f"cannot load models.{what} = {ref!r}: {type(exc).__name__}: {exc}")


@dataclass
class SDXLParts:
    """The SDXL pieces a trainer needs, loaded separately so only the U-Net is trained."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any
    base: str


def load_sdxl_frozen(models: ModelsParams, text_encoder_dtype: torch.dtype | None = None) -> tuple[Any, Any, Any]:
    """The parts a U-Net fine-tune keeps frozen: (vae, text_encoder, text_encoder_2). The encoders load
    straight into `text_encoder_dtype`, so no float32 copy of them is made first."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models.require("sdxl")
    base = resolve_ref(models.sdxl, "sdxl")
    kw = hub_kwargs(models)
    encoder_kw = kw | ({"dtype": text_encoder_dtype} if text_encoder_dtype is not None else {})
    try:
        if models.vae:
            vae = AutoencoderKL.from_pretrained(resolve_ref(models.vae, "vae"))
        else:
            vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **encoder_kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **encoder_kw)
    except OSError as exc:
        raise _hub_error("sdxl", models.sdxl, exc) from None
    return vae, text_encoder, text_encoder_2


def load_sdxl_parts(
    models: ModelsParams, unet_dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None
) -> SDXLParts:
    """Every part of the base pipeline; the U-Net loads straight into `unet_dtype` when it is given
    (a bf16 U-Net never exists in float32 first: 5 GB instead of 10 at SDXL's size)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    models.require("sdxl")
    base = resolve_ref(models.sdxl, "sdxl")
    kw = hub_kwargs(models)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            base, subfolder="unet", **kw, **({"dtype": unet_dtype} if unet_dtype is not None else {})
        )
        # The class SDXL's model_index.json names. AutoTokenizer would first look for a config.json in
        # the tokenizer folder, which the repository has not: offline, from a cache filled by
        # `huggingface-cli download` (no record of missing files), that lookup fails.
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=models.revision)
        tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=models.revision)
        # Training noise comes from DDPM with the base model's schedule, as in diffusers' SDXL example.
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=models.revision)
    except OSError as exc:
        raise _hub_error("sdxl", models.sdxl, exc) from None
    vae, text_encoder, text_encoder_2 = load_sdxl_frozen(models, text_encoder_dtype)
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, noise_scheduler, base)


def load_sdxl_pipeline(path_or_id: str, models: ModelsParams | None = None, dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline from a folder (a trained model) or a hub id (the base)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    kw: dict[str, Any] = {"dtype": dtype}
    if models is not None:
        kw.update(hub_kwargs(models))
        if models.vae and not Path(path_or_id).is_dir():
            kw["vae"] = AutoencoderKL.from_pretrained(resolve_ref(models.vae, "vae"), dtype=dtype)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(resolve_ref(path_or_id, "sdxl"), **kw)
    except OSError as exc:
        raise _hub_error("sdxl", path_or_id, exc) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_blip(models: ModelsParams, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    models.require("blip")
    ref = resolve_ref(models.blip, "blip")
    try:
        processor = BlipProcessor.from_pretrained(ref, revision=models.revision if ref == models.blip else None)
        model = BlipForConditionalGeneration.from_pretrained(ref, dtype=dtype)
    except OSError as exc:
        raise _hub_error("blip", models.blip, exc) from None
    return model.to(device or default_device()).eval(), processor


def load_open_clip(models: ModelsParams, device: torch.device | None = None):
    """(model, preprocess, tokenizer) from open_clip: a built-in name + pretrained tag, or local-dir:."""
    import open_clip

    models.require("clip_model")
    name = models.clip_model
    if name.startswith("local-dir:"):
        name = "local-dir:" + resolve_ref(name[len("local-dir:") :], "clip_model")
    pretrained = models.clip_pretrained
    if pretrained and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device or default_device(), weights_only=True
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _hub_error("clip_model", models.clip_model, exc) from None
    return model.eval(), preprocess, tokenizer


def fetch_to_cache(url: str, expected_sha256: str | None = None) -> Path:
    """Download a weights file once (TLS verified) into the Easel cache; reuse it afterwards."""
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + Path(url.split("?")[0]).name
    target = CACHE_DIR / "weights" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EaselError(f"cannot download {url}: {exc}") from None
    if expected_sha256:
        from components.fsutil import sha256_file

        if sha256_file(tmp) != expected_sha256:
            tmp.unlink(missing_ok=True)
            raise EaselError(f"{url}: downloaded file does not match its expected sha256")
    tmp.replace(target)
    return target


def aesthetic_weights_path(models: ModelsParams) -> Path:
    models.require("aesthetic")
    ref = models.aesthetic
    if ref.startswith("https://"):
        return fetch_to_cache(ref)
    if ref.startswith("http://"):
        raise EaselError("params.yaml: models.aesthetic: weights are only fetched over https")
    return Path(resolve_ref(ref, "aesthetic"))
