"""What a training run needs before it starts: accelerator memory by arithmetic, disk by folder.

`easel train --plan` prints both for the active params; every run checks the disk part when it
starts and refuses to begin when a filesystem cannot hold what the run will write, naming the
settings that change it. Nothing is loaded but configs: the model's parameter shapes come from its
U-Net, VAE and text-encoder configs, built on the meta device.

Memory (the accelerator's allocated memory, or RAM when training on the CPU) peaks in one of two
places, and the plan takes the larger:
- the forward pass: weights, optimizer state, the EMA when it lives on the accelerator, the frozen
  parts when no cache takes them off it, autocast's bf16/fp16 copies of fp32 weights (held until
  the forward pass ends), and the activations;
- the optimizer step: the same tensors with every gradient (none with the fused backward pass),
  torch's AdamW's temporaries (one fp32 copy of the weights) and what is left of the activations.
The activation figures were measured for the SDXL U-Net on an H200 (benchmarks/sdxl_gpu.py;
benchmarks/RESULTS.md, "On a GPU"): per 1024 x 1024 image, 0.9 GB with gradient checkpointing and
8.9 GB without, in proportion to the pixel count (checked at 768 px), over 17 rows of recipes,
resolutions and batch sizes the arithmetic is within 3 % of the measured peak. PyTorch's caching
allocator reserves more than it allocates (up to 1.5x with the fused pass), which the GPU must
also hold. On the CPU the process adds its interpreter, libraries and the blocks glibc keeps
(2 GB, measured by the full-size rehearsal, benchmarks/sdxl_rehearsal.py).

Disk, the most a run holds at once:
- checkpoints: `keep_checkpoints` of them plus the one being written (the oldest is removed after
  the new one is complete), each the U-Net in its training dtype, the optimizer state and the EMA
  in its dtype;
- best weights (validation with `keep_best`): the current best plus the one each kept checkpoint
  refers to, in the save precision;
- the model folder (the U-Net in the save precision, the VAE and encoders in float32 as the base
  has them), written beside the previous one, which is already on the disk, and replaced by a rename;
- the latent and text-embedding caches;
- the base model's download into the Hugging Face cache, when it is not there yet.
What a resumed or repeated run wrote before counts as present, not as more (`Need.present`).
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.config import ModelsParams, TrainParams
from components.plumbing.errors import ConfigError
from components.train.memory import ema_horizon_steps

GB = 1e9
# Measured (see the module docstring): activations per 1024 x 1024 image, by gradient checkpointing.
ACTIVATIONS_GB_PER_IMAGE = {True: 0.9, False: 8.9}
FORWARD_BASE_GB = 0.2  # the forward pass's other buffers
STEP_BASE_GB, STEP_GB_PER_IMAGE = 0.3, 0.3  # what the optimizer step holds beside the tensors
PROCESS_GB = 2.0  # training on the CPU: interpreter, libraries and glibc's kept blocks (RSS)
WIDTH = {"float32": 4, "float": 4, "fp32": 4, "bf16": 2, "fp16": 2}
LATENT_CHANNELS_BYTES = 2 * 4 * 4  # the cached mean and std of 4 latent channels, float32
TOKENIZER_BYTES = 2 * 4_000_000  # two CLIP tokenizers (tokenizer.json, vocab, merges)
TEXT_DIM, POOLED_DIM, TEXT_TOKENS = 2048, 1280, 77 * 3  # the longest layout (225 tokens) is assumed


@dataclass
class Need:
    """Bytes a run writes to one folder, what they are, and the settings that change them."""

    what: str
    folder: Path
    bytes: int
    detail: str
    settings: str
    present: int = 0  # of those bytes, what is on the disk already (a resumed or repeated run)

    @property
    def more(self) -> int:
        """Bytes the run still has to find room for."""
        return max(0, self.bytes - self.present)


@dataclass
class TrainPlan:
    model: str
    unet_parameters: int
    memory_gb: dict[str, float]
    disk: list[Need] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        where = "RAM: no GPU seen, training on the CPU" if self.memory_gb["process (CPU)"] else "GPU, allocated"
        lines = [f"model: {self.model} (U-Net {self.unet_parameters:,} parameters)", "", f"memory ({where}):"]
        shown = {name: value for name, value in self.memory_gb.items() if value or name == "total"}
        lines += [f"  {name:<17} {size(value * GB):>10}" for name, value in shown.items()]
        lines += ["", "disk (the most held at once):"]
        for need in self.disk:
            there = f"; {size(need.present)} of it there already" if need.present else ""
            lines.append(f"  {need.what:<14} {size(need.bytes):>10}  {need.folder}  ({need.detail}{there})")
        lines.append(f"  {'total':<14} {size(sum(n.bytes for n in self.disk)):>10}")
        for needed, free, folders in filesystems(self.disk).values():
            verdict = "fits" if needed <= free else "DOES NOT FIT"
            lines.append(f"  filesystem of {folders[0]}: {size(needed)} needed, {size(free)} free: {verdict}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def adafactor_state(shape: tuple[int, ...], largest_two: bool) -> int:
    """Numbers Adafactor keeps for one parameter: a row and a column mean over its two factored
    dimensions, or one per element (see components/train/optim.py)."""
    if len(shape) < 2:
        return numel(shape)
    if not largest_two:
        return numel(shape[:-1]) + numel(shape[:-2] + shape[-1:])
    second, first = sorted(shape)[-2:]
    if second < 128:
        return numel(shape)
    return numel(shape) // first + numel(shape) // second


def optimizer_bytes(train: TrainParams, shapes: list[tuple[int, ...]]) -> int:
    count = sum(numel(s) for s in shapes)
    if train.optimizer == "adamw":
        return 8 * count  # two fp32 moments
    if train.optimizer == "adamw8bit":
        return 2 * count  # two 8-bit moments (their per-block scales are not counted)
    largest = train.optimizer_args.factored_dims == "largest_two"
    return 4 * sum(adafactor_state(s, largest) for s in shapes)  # fp32 second moments, no momentum


def memory_gb(
    train: TrainParams, shapes: list[tuple[int, ...]], frozen_bytes: int = 0, device: str | None = None
) -> dict[str, float]:
    """The memory arithmetic of a configuration, in GB: its parts, the two peaks and the total (the
    larger peak, plus the process on the CPU). `device`: "cuda" or "cpu" (default: a GPU if torch
    sees one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    count = sum(numel(s) for s in shapes)
    width = 2 if train.full_bf16 else 4
    images = train.train_batch_size * (train.resolution / 1024) ** 2
    autocast = train.mixed_precision in ("bf16", "fp16") and not train.full_bf16
    torch_adamw = train.optimizer == "adamw" and not (train.full_bf16 or train.fused_backward_pass)
    parts = {
        "weights": count * width / GB,
        "gradients": 0.0 if train.fused_backward_pass else count * width / GB,
        "optimizer": optimizer_bytes(train, shapes) / GB,
        "ema": count * WIDTH[train.ema.dtype] / GB if train.ema.enabled and train.ema.device == "accelerator" else 0.0,
        "frozen parts": frozen_bytes / GB,
        "autocast copies": count * 2 / GB if autocast else 0.0,
        "step temporaries": count * 4 / GB if torch_adamw else 0.0,
        "activations": FORWARD_BASE_GB + ACTIVATIONS_GB_PER_IMAGE[train.gradient_checkpointing] * images,
    }
    held = parts["weights"] + parts["optimizer"] + parts["ema"] + parts["frozen parts"]
    forward = held + parts["autocast copies"] + parts["activations"]
    step = held + parts["gradients"] + parts["step temporaries"] + STEP_BASE_GB + STEP_GB_PER_IMAGE * images
    process = PROCESS_GB if device == "cpu" else 0.0
    peaks = {"forward peak": forward, "step peak": step, "process (CPU)": process}
    return parts | peaks | {"total": max(forward, step) + process}


def checkpoint_bytes(train: TrainParams, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """One checkpoint's files, by part."""
    count = sum(numel(s) for s in shapes)
    parts = {"U-Net": count * (2 if train.full_bf16 else 4), "optimizer": optimizer_bytes(train, shapes)}
    if train.ema.enabled:
        parts["EMA"] = count * WIDTH[train.ema.dtype]
    return parts


def model_shapes(models: ModelsParams) -> tuple[str, dict[str, list[tuple[int, ...]]], str | None]:
    """(config source, parameter shapes of unet/vae/text_encoder/text_encoder_2, hub id or None)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from components.models.loaders import _hub_error, resolve_ref, sdxl_config_ref
    from components.models.single_file import is_single_file

    models.require("sdxl")
    base = resolve_ref(models.sdxl, "sdxl")
    source = sdxl_config_ref(models, base) if is_single_file(base) else base
    revision = {"revision": models.revision} if models.revision and source == base else {}
    # diffusers passes a deprecated argument to huggingface_hub when it reads a config: not the user's to fix.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **revision)
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **revision)
        text = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", **revision)
        text_2 = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder_2", **revision)
    except OSError as exc:
        raise _hub_error("sdxl", models.sdxl, exc) from None
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(unet_config),
            "vae": AutoencoderKL.from_config(vae_config),
            "text_encoder": CLIPTextModel(text),
            "text_encoder_2": CLIPTextModelWithProjection(text_2),
        }
    shapes = {name: [tuple(p.shape) for p in m.parameters()] for name, m in modules.items()}
    hub_id = None if Path(base).exists() else base
    return source, shapes, hub_id


def hub_download_bytes(models: ModelsParams, hub_id: str, shapes: dict[str, list]) -> tuple[int, list[str]]:
    """Bytes of the base's weight files not yet in the Hugging Face cache, estimated from the
    parameter counts in the files' width; and which parts those are."""
    from huggingface_hub import try_to_load_from_cache

    variant = f".{models.variant}" if models.variant else ""
    width = 2 if models.variant in ("fp16", "bf16") else 4
    files = {  # part: (repository, file, revision, bytes per parameter)
        "unet": (hub_id, f"unet/diffusion_pytorch_model{variant}.safetensors", models.revision, width),
        "vae": (hub_id, f"vae/diffusion_pytorch_model{variant}.safetensors", models.revision, width),
        "text_encoder": (hub_id, f"text_encoder/model{variant}.safetensors", models.revision, width),
        "text_encoder_2": (hub_id, f"text_encoder_2/model{variant}.safetensors", models.revision, width),
    }
    if models.vae:  # loaded instead of the base's VAE: a float32 file of its own repository
        del files["vae"]
        if not Path(models.vae).exists():
            files["vae"] = (models.vae, "diffusion_pytorch_model.safetensors", None, 4)
    missing = [
        name
        for name, (repo, filename, revision, _) in files.items()
        if not isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)
    ]
    total = sum(sum(numel(s) for s in shapes[name]) * files[name][3] for name in missing)
    by_repo: dict[str, list[str]] = {}
    for name in missing:
        by_repo.setdefault(files[name][0], []).append(name)
    return total, [f"{', '.join(names)} of {repo}" for repo, names in by_repo.items()]


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def plan_training(
    train: TrainParams,
    models: ModelsParams,
    images: int | None = None,
    run_dir: Path | None = None,
    device: str | None = None,
) -> TrainPlan:
    """Memory and disk for `train` with `models` on `images` captioned images (None: not known yet).
    With the run's checkpoint folder `run_dir`, what a resumed or repeated run has written there
    already (checkpoints, best weights) and the caches' files count as present, not as more."""
    source, shapes, hub_id = model_shapes(models)
    unet = shapes["unet"]
    count = sum(numel(s) for s in unet)
    save_width = WIDTH[train.save_precision]
    encoder_width = 2 if train.mixed_precision in ("bf16", "fp16") else 4
    frozen = 0
    if not train.cache_latents:
        frozen += 4 * sum(numel(s) for s in shapes["vae"])  # the VAE encodes in float32
    if not train.cache_text_embeddings:
        frozen += encoder_width * sum(numel(s) for n in ("text_encoder", "text_encoder_2") for s in shapes[n])
    plan = TrainPlan(models.sdxl or source, count, memory_gb(train, unet, frozen, device))
    if plan.memory_gb["process (CPU)"] == 0:
        plan.notes.append(
            "GPU memory: PyTorch's caching allocator reserves more than it allocates (up to 1.5x with the fused "
            "backward pass, measured on an H200); PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True narrows the gap"
        )
    if train.ema.enabled:
        ema = train.ema
        horizon = ema_horizon_steps(ema.decay, ema.update_every, ema.warmup, train.max_train_steps)
        share = 100 * horizon["first_update_share"]
        plan.notes.append(
            f"EMA: at step {train.max_train_steps} it looks back {horizon['horizon_steps']:.0f} steps (the set decay: "
            f"{horizon['set_horizon_steps']:.0f}); the first update's weights are {share:.1f}% of it"
        )
        if horizon["first_update_share"] > 0.25:
            plan.notes.append(
                "the EMA is still mostly the weights it started from: lower train.ema.decay or train.ema.update_every"
            )
        if ema.device == "cpu":
            plan.notes.append(
                f"the EMA takes {size(count * WIDTH[ema.dtype])} of CPU memory (main process only), and each update "
                "copies the U-Net there: 20 s for SDXL's on an H200 machine's host, against 1.5 s per training step; "
                "train.ema.device: accelerator trades that time for GPU memory"
            )

    checkpoint_dir = Path(train.checkpoint_dir)
    if train.checkpoint_every:
        per = checkpoint_bytes(train, unet)
        held = min(train.keep_checkpoints + 1, max(1, train.max_train_steps // train.checkpoint_every))
        detail = f"{held} x {size(sum(per.values()))}: " + ", ".join(f"{k} {size(v)}" for k, v in per.items())
        plan.disk.append(
            Need(
                "checkpoints",
                checkpoint_dir,
                held * sum(per.values()),
                detail,
                "train.keep_checkpoints, train.checkpoint_every, train.ema.dtype, train.checkpoint_dir",
            )
        )
    if train.validation.fraction > 0 and train.validation.keep_best:
        every = train.validation.every_n_steps
        checks = max(1, train.max_train_steps // every) if every else 1
        held = min(checks, (train.keep_checkpoints + 2) if train.checkpoint_every else 2)
        plan.disk.append(
            Need(
                "best weights",
                checkpoint_dir,
                held * count * save_width,
                f"up to {held} x {size(count * save_width)} in {train.save_precision}",
                "train.validation.keep_best, train.keep_checkpoints, train.save_precision",
            )
        )
    frozen_count = sum(sum(numel(s) for s in shapes[n]) for n in ("vae", "text_encoder", "text_encoder_2"))
    plan.disk.append(
        Need(
            "model",
            Path(train.out_dir),
            count * save_width + 4 * frozen_count + TOKENIZER_BYTES,
            f"the U-Net in {train.save_precision}, the VAE and encoders in float32 as the base has them, the "
            "tokenizers; a previous model is replaced only once this one is whole",
            "train.save_precision, train.out_dir",
        )
    )
    if run_dir is not None:
        present = {
            "checkpoints": sum(folder_bytes(d) for d in run_dir.glob("step-*")),
            "best weights": folder_bytes(run_dir / "best"),
        }
        for need in plan.disk:
            need.present = min(need.bytes, present.get(need.what, 0))
    if (train.cache_latents or train.cache_text_embeddings) and images is None:
        plan.notes.append("no caption table yet: the caches' size is not counted")
    elif images:
        latent_side = train.resolution // 8
        flips = 2 if train.random_flip else 1
        cache = 0
        if train.cache_latents:
            cache += images * flips * LATENT_CHANNELS_BYTES * latent_side * latent_side
        if train.cache_text_embeddings:
            cache += images * 4 * (TEXT_TOKENS * TEXT_DIM + POOLED_DIM)
        if cache:
            plan.disk.append(
                Need(
                    "caches",
                    Path(train.cache_dir),
                    cache,
                    f"{images} images" + (" x 2 flips" if flips == 2 else ""),
                    "train.cache_latents, train.cache_text_embeddings, train.cache_dir",
                    # Entries made before are kept and reused (other runs' too: a floor, not exact).
                    present=min(cache, folder_bytes(Path(train.cache_dir)) if run_dir is not None else 0),
                )
            )
    if hub_id is not None:
        download, parts = hub_download_bytes(models, hub_id, shapes)
        if download:
            plan.disk.append(
                Need(
                    "hub download",
                    hub_cache_dir(),
                    download,
                    "; ".join(parts) + (f" (the base's {models.variant} files)" if models.variant else ""),
                    "models.variant, HF_HUB_CACHE",
                )
            )
    return plan


def _existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def filesystems(disk: list[Need]) -> dict[int, tuple[int, int, list[Path]]]:
    """Per filesystem: (bytes needed, bytes free, the folders on it)."""
    out: dict[int, tuple[int, int, list[Path]]] = {}
    for need in disk:
        existing = _existing(need.folder)
        device = os.stat(existing).st_dev
        needed, free, folders = out.get(device, (0, shutil.disk_usage(existing).free, []))
        out[device] = (needed + need.more, free, [*folders, need.folder])
    return out


def fits(plan: TrainPlan) -> bool:
    return all(needed <= free for needed, free, _ in filesystems(plan.disk).values())


def check_disk(plan: TrainPlan) -> None:
    """Refuse a run whose files cannot fit on the disks they go to, naming the settings to change."""
    for device, (needed, free, folders) in filesystems(plan.disk).items():
        if needed <= free:
            continue
        here = [n for n in plan.disk if os.stat(_existing(n.folder)).st_dev == device]
        parts = "; ".join(f"{n.what} {size(n.more)} more ({n.detail}): {n.settings}" for n in here)
        raise ConfigError(
            f"train: this run would write {size(needed)} to the filesystem of {folders[0]}, which has "
            f"{size(free)} free. Change what it writes: {parts}. `easel train --plan` shows the figures."
        )
