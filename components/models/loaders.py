"""Loading models by hub id or local path: the same code for the real models and the tiny ones.

A reference that names an existing local path loads from disk; anything else goes to the hub
through `from_pretrained`. A reference into the tiny model folder that does not exist yet is
built first (it is Easel's own deterministic build), so `dvc repro` works from a fresh clone.
An SDXL model (or VAE) may also be a single-file `.safetensors` checkpoint (A1111/ComfyUI/kohya
layout); it is read with diffusers' single-file loader and the configs named by `models.sdxl_config`.
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
from components.models.single_file import is_single_file, load_single_file_pipeline
from components.plumbing.errors import ConfigError, EaselError

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
    if path.is_file():
        # Not resolved: a single-file checkpoint in a hub cache is a link to a blob without its file name.
        return str(path.absolute())
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


# Weights are read from safetensors only: a folder or hub snapshot with only pickle files
# (pytorch_model.bin, diffusion_pytorch_model.bin) is refused by the loader instead of unpickled.
SAFE_WEIGHTS: dict[str, Any] = {"use_safetensors": True}


def require_safetensors(folder: str | Path, filename: str, what: str) -> None:
    """A local model folder must hold its weights as `filename` (safetensors): libraries that fall
    back to a pickle beside it (timm, open_clip) are not given the chance."""
    if not (Path(folder) / filename).is_file():
        raise EaselError(
            f"models.{what}: {folder} has no {filename}; weights in pickle files (.bin, .pth) are not read, "
            "convert them to safetensors"
        )


def require_hub_safetensors(repo: str, filename: str, what: str) -> None:
    """A hub repository must offer its weights as `filename` (safetensors): fetched now (or found in
    the cache offline), so timm and open_clip, which fall back to a pickle when it is missing, read it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo, filename)
    except (OSError, ValueError, EntryNotFoundError) as exc:  # a missing file, repository, cache entry or bad id
        raise EaselError(
            f"models.{what}: {filename} cannot be had from {repo} ({type(exc).__name__}); weights in pickle "
            "files (.bin, .pth) are not read"
        ) from None


def open_clip_hub_repo(name: str, pretrained: str | None) -> str | None:
    """The hub repository open_clip fetches `name` + `pretrained` from (None: not from the hub)."""
    import open_clip

    if name.startswith("hf-hub:"):
        return name[len("hf-hub:") :]
    if name.startswith("local-dir:") or not pretrained or Path(pretrained).exists():
        return None
    hf_hub = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub")
    if not hf_hub:
        raise EaselError(
            f"models.clip_pretrained: {pretrained!r} for {name} is published only as a pickle download; "
            "choose a tag open_clip fetches from the hub, or give a .safetensors file"
        )
    return "/".join(hf_hub.split("/")[:2])


def hub_kwargs(models: ModelsParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(SAFE_WEIGHTS)
    if models.revision:
        kwargs["revision"] = models.revision
    if models.variant:
        kwargs["variant"] = models.variant
    return kwargs


def _hub_error(what: str, ref: str, exc: Exception) -> EaselError:
    return EaselError(f"cannot load models.{what} = {ref!r}: {type(exc).__name__}: {exc}")


def sdxl_config_ref(models: ModelsParams, checkpoint: str) -> str:
    """The diffusers configs a single-file checkpoint is read with: a folder, or a hub id in the cache."""
    if not models.sdxl_config:
        raise ConfigError(
            f"params.yaml: models.sdxl_config must be set: {checkpoint} is a single-file checkpoint, read with "
            "a diffusers config (a pipeline folder, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0)"
        )
    return resolve_ref(models.sdxl_config, "sdxl_config")


def load_vae(models: ModelsParams, dtype: torch.dtype = torch.float32):
    """The models.vae override: a diffusers VAE folder or hub id, or a single VAE file (e.g. sdxl_vae.safetensors),
    read with the VAE config of the SDXL configs in use."""
    from diffusers import AutoencoderKL

    ref = resolve_ref(models.vae, "vae")
    try:
        if is_single_file(ref):
            base = resolve_ref(models.sdxl, "sdxl") if models.sdxl else ""
            config = sdxl_config_ref(models, ref) if not base or is_single_file(base) else base
            return AutoencoderKL.from_single_file(
                ref, config=config, subfolder="vae", local_files_only=True, dtype=dtype
            )
        return AutoencoderKL.from_pretrained(ref, dtype=dtype, **SAFE_WEIGHTS)
    except (OSError, ValueError) as exc:
        raise _hub_error("vae", models.vae, exc) from None


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
    # Where the scheduler and tokenizer configs come from: the base itself, or models.sdxl_config for a
    # single-file base.
    config_source: str = ""

    def __post_init__(self) -> None:
        self.config_source = self.config_source or self.base


def _single_file_parts(models: ModelsParams, base: str):
    """(pipeline, config ref) of a single-file SDXL base, read offline with its configs; float32."""
    config = sdxl_config_ref(models, base)
    extra = {"vae": load_vae(models)} if models.vae else {}
    return load_single_file_pipeline(base, config, torch.float32, **extra), config


def load_sdxl_frozen(models: ModelsParams, text_encoder_dtype: torch.dtype | None = None) -> tuple[Any, Any, Any]:
    """The parts a U-Net fine-tune keeps frozen: (vae, text_encoder, text_encoder_2). The VAE is float32
    whatever the variant (it encodes in float32); the encoders load straight into `text_encoder_dtype`
    (float32 if None), so no float32 copy of them is made first."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models.require("sdxl")
    base = resolve_ref(models.sdxl, "sdxl")
    encoder_dtype = text_encoder_dtype or torch.float32
    if is_single_file(base):
        pipe, _ = _single_file_parts(models, base)
        return pipe.vae, pipe.text_encoder.to(encoder_dtype), pipe.text_encoder_2.to(encoder_dtype)
    kw = hub_kwargs(models)  # an fp16 variant only saves download bytes
    try:
        vae = (
            load_vae(models)
            if models.vae
            else AutoencoderKL.from_pretrained(base, subfolder="vae", **kw, dtype=torch.float32)
        )
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw, dtype=encoder_dtype)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            base, subfolder="text_encoder_2", **kw, dtype=encoder_dtype
        )
    except OSError as exc:
        raise _hub_error("sdxl", models.sdxl, exc) from None
    return vae, text_encoder, text_encoder_2


def load_sdxl_parts(
    models: ModelsParams, unet_dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None
) -> SDXLParts:
    """Every part of the base pipeline; the U-Net loads straight into `unet_dtype` when it is given
    (a bf16 U-Net never exists in float32 first: 5 GB instead of 10 at SDXL's size), else float32."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    models.require("sdxl")
    base = resolve_ref(models.sdxl, "sdxl")
    if is_single_file(base):
        pipe, config = _single_file_parts(models, base)
        try:
            noise_scheduler = DDPMScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=True)
        except OSError as exc:
            raise _hub_error("sdxl_config", models.sdxl_config or "", exc) from None
        encoder_dtype = text_encoder_dtype or torch.float32
        encoders = (pipe.text_encoder.to(encoder_dtype), pipe.text_encoder_2.to(encoder_dtype))
        unet = pipe.unet.to(unet_dtype or torch.float32)
        return SDXLParts(unet, pipe.vae, *encoders, pipe.tokenizer, pipe.tokenizer_2, noise_scheduler, base, config)
    kw = hub_kwargs(models)
    try:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw, dtype=unet_dtype or torch.float32)
        # The class model_index.json names. AutoTokenizer would first look for tokenizer/config.json, which
        # SDXL's repository lacks: offline, with a cache filled by snapshot_download, that look-up fails.
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=models.revision)
        tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=models.revision)
        # Training noise comes from DDPM with the base model's schedule, as in diffusers' SDXL example.
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=models.revision)
    except OSError as exc:
        raise _hub_error("sdxl", models.sdxl, exc) from None
    vae, text_encoder, text_encoder_2 = load_sdxl_frozen(models, text_encoder_dtype)
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, noise_scheduler, base)


def load_sdxl_pipeline(path_or_id: str, models: ModelsParams | None = None, dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline from a folder (a trained model), a hub id (the base) or a single-file
    checkpoint (read with models.sdxl_config). With `models`, a hub id or single file gets models.vae."""
    from diffusers import StableDiffusionXLPipeline

    ref = resolve_ref(path_or_id, "sdxl")
    vae_override = models is not None and bool(models.vae) and not Path(ref).is_dir()
    if is_single_file(ref):
        if models is None:
            raise EaselError(f"{ref}: a single-file checkpoint needs models.sdxl_config to be read")
        extra = {"vae": load_vae(models, dtype)} if vae_override else {}
        return load_single_file_pipeline(ref, sdxl_config_ref(models, ref), dtype, **extra)
    kw: dict[str, Any] = {"dtype": dtype, **SAFE_WEIGHTS}
    if models is not None:
        kw.update(hub_kwargs(models))
        if vae_override:
            kw["vae"] = load_vae(models, dtype)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(ref, **kw)
    except OSError as exc:
        raise _hub_error("sdxl", path_or_id, exc) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_blip(models: ModelsParams, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    models.require("blip")
    ref = resolve_ref(models.blip, "blip")
    try:
        # models.revision pins the SDXL repository only; a commit of one repository is no revision of another.
        processor = BlipProcessor.from_pretrained(ref)
        model = BlipForConditionalGeneration.from_pretrained(ref, dtype=dtype, **SAFE_WEIGHTS)
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
        require_safetensors(name[len("local-dir:") :], "open_clip_model.safetensors", "clip_model")
    pretrained = models.clip_pretrained
    if pretrained and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    if repo := open_clip_hub_repo(name, pretrained):
        require_hub_safetensors(repo, "open_clip_model.safetensors", "clip_model")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device or default_device(), weights_only=True
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _hub_error("clip_model", models.clip_model, exc) from None
    return model.eval(), preprocess, tokenizer


def fetch_to_cache(url: str, expected_sha256: str | None = None) -> Path:
    """Download a weights file once (TLS verified) into the Easel cache; reuse it afterwards.

    With `expected_sha256` the download is checked before it is kept, and a cached copy is checked
    again before it is reused (a damaged copy is fetched again).
    """
    from components.plumbing.fsutil import sha256_file

    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + Path(url.split("?")[0]).name
    target = CACHE_DIR / "weights" / name
    if target.is_file():
        if not expected_sha256 or sha256_file(target) == expected_sha256:
            return target
        log.warning("%s: cached copy does not match its sha256; fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + f".{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        if expected_sha256 and (got := sha256_file(tmp)) != expected_sha256:
            raise EaselError(f"{url}: downloaded file has sha256 {got}, expected {expected_sha256}; not kept")
        tmp.replace(target)
    except OSError as exc:
        raise EaselError(f"cannot download {url}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def aesthetic_weights_path(models: ModelsParams) -> Path:
    """The LAION aesthetic weights: fetched over https into the Easel cache, or a local file. When
    models.aesthetic_sha256 is set, the file (downloaded or local) must have that sha256."""
    from components.plumbing.fsutil import sha256_file

    models.require("aesthetic")
    ref = models.aesthetic
    if ref.startswith("https://"):
        if not models.aesthetic_sha256:
            log.warning("models.aesthetic is fetched without a pinned sha256 (set models.aesthetic_sha256)")
        return fetch_to_cache(ref, models.aesthetic_sha256)
    if ref.startswith("http://"):
        raise EaselError("params.yaml: models.aesthetic: weights are only fetched over https")
    path = Path(resolve_ref(ref, "aesthetic"))
    if models.aesthetic_sha256 and path.is_file() and (got := sha256_file(path)) != models.aesthetic_sha256:
        raise EaselError(f"{path}: sha256 {got} does not match models.aesthetic_sha256 {models.aesthetic_sha256}")
    return path
