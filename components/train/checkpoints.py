"""Checkpoints: save every N steps, keep the last K, resume exactly, and never run what a file says.

A checkpoint folder `<checkpoint_dir>/<run id>/step-XXXXXXXX/` holds data only (tensor_tree: JSON
beside safetensors), never a pickle, so a checkpoint from a shared disk cannot run code:
- `unet.safetensors`: the U-Net's weights;
- `optimizer`, `lr_scheduler`, `train` (Easel's TrainState, accelerate's step and loss scaler) and
  `ema`, each a `.json` + `.safetensors` pair written by the main process;
- `rng_<rank>`: each process's RNG states (Python, NumPy, torch, CUDA, and its noise generator);
- `easel_checkpoint.json` (written last): its step, run id and the run's identity.
The run id is a hash of everything that defines the training except how long it runs, so
`resume_from_checkpoint: latest` never resumes a different run, and a checkpoint named by path is
refused (naming the settings that differ) when it belongs to another. Files with other names (an
accelerate `save_state` folder's `.bin`/`.pkl`) are never opened.

`best/step-XXXXXXXX.safetensors` holds the U-Net weights with the lowest validation loss so far,
and `best/best.json` names them. Each checkpoint records the best step it knew, so a resumed run
finds its own best again even when the crashed run had found a later one. Best files that no
kept checkpoint and not the running state refer to are removed when a checkpoint is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config import ModelsParams, TrainParams
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_write_json
from components.plumbing.tensor_tree import check_safetensors, load_tree, save_tree

MARKER = "easel_checkpoint.json"
UNET_FILE = "unet.safetensors"
# Settings that change how long or how visibly a run goes, not what it computes: a run may be
# resumed after changing them.
NOT_IDENTITY = {
    "max_train_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "resume_from_checkpoint",
    "out_dir",
    "checkpoint_dir",
    "cache_dir",
    "sample_every_n_steps",
    "sample_prompts",
    "sample_negative_prompt",
    "sample_seed",
    "sample_steps",
    "cache_memory_mb",
    "dataloader_num_workers",
    "log_every_n_steps",
}


class TrainState:
    """The loop's own counters (the optimizer step, validation losses), saved in `train.json`, and
    this process's generator for noise, timesteps and latent samples (saved in `rng_<rank>`)."""

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        # The held-out loss of the U-Net before any step (the base model's), and at the last validation.
        self.base_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "base_val_loss": self.base_val_loss,
            "last_val_loss": self.last_val_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = state["best_step"]
        self.base_val_loss = state["base_val_loss"]
        self.last_val_loss = state["last_val_loss"]


def run_identity(params: TrainParams, models: ModelsParams, data_fingerprint: str) -> dict:
    """What defines a run's computation: every setting but those in NOT_IDENTITY, and the data."""
    identity = {k: v for k, v in params.model_dump(mode="json").items() if k not in NOT_IDENTITY}
    identity["validation"] = {"fraction": params.validation.fraction}
    return {"train": identity, "models": models.model_dump(mode="json"), "data": data_fingerprint}


def run_id(identity: dict) -> str:
    payload = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def step_dirs(run_dir: Path) -> list[Path]:
    """This run's complete checkpoints, oldest first (a folder without its marker is unfinished)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def best_path(run_dir: Path, step: int) -> Path:
    return run_dir / "best" / f"step-{step:08d}.safetensors"


def save_best(run_dir: Path, weights: dict[str, torch.Tensor], step: int, val_loss: float) -> None:
    from safetensors.torch import save_file

    target = best_path(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(partial))
    partial.replace(target)
    atomic_write_json(run_dir / "best" / "best.json", {"step": step, "val_loss": val_loss, "file": target.name})
    prune_best(run_dir, step)


def load_best(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = best_path(run_dir, step)
    if not path.is_file():
        raise EaselError(
            f"train: the best weights of step {step} ({path}) are missing; set validation.keep_best: false "
            "to save the last weights instead"
        )
    return load_file(str(path))


def prune_best(run_dir: Path, current: int | None) -> None:
    """Remove best files that neither the running state nor a kept checkpoint refers to."""
    wanted = {current} | {json.loads((d / MARKER).read_text()).get("best_step") for d in step_dirs(run_dir)}
    for path in (run_dir / "best").glob("step-*.safetensors"):
        if int(path.stem.split("-")[1]) not in wanted:
            path.unlink(missing_ok=True)


FORMAT = "easel-checkpoint/2"  # data only; format 1 was accelerate's save_state (pickles)


@dataclass
class Resumable:
    """What a checkpoint saves and a resume restores: the prepared U-Net, optimizer and scheduler,
    Easel's TrainState and the EMA (None when off)."""

    unet: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    state: TrainState
    ema: Any = None


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, parts: Resumable, identity: dict) -> Path:
    """Write the checkpoint of `step` (every process calls this) and keep the last `keep`."""
    target = run_dir / f"step-{step:08d}"
    partial = run_dir / f".step-{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(parts.unet)  # every process: a sharded model needs them all
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        partial.mkdir(parents=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(partial / UNET_FILE))
        save_tree(partial, "optimizer", parts.optimizer.state_dict())
        save_tree(partial, "lr_scheduler", parts.lr_scheduler.state_dict())
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_tree(
            partial, "train", {"state": parts.state.state_dict(), "accelerate_step": accelerator.step, "scaler": scaler}
        )
        if parts.ema is not None:
            save_tree(partial, "ema", parts.ema.state_dict())
    del weights
    accelerator.wait_for_everyone()
    save_tree(partial, f"rng_{accelerator.process_index}", rng_states(parts.state.generator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"format": FORMAT, "step": step, "run": run_dir.name, "best_step": parts.state.best_step}
        atomic_write_json(partial / MARKER, marker | {"processes": accelerator.num_processes, "identity": identity})
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # complete, or not there: never half a checkpoint under a real name
        for old in step_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        prune_best(run_dir, parts.state.best_step)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, folder: Path, parts: Resumable) -> None:
    """Restore everything `save_checkpoint` wrote (every process calls this)."""
    from safetensors.torch import load_file

    rng_name = f"rng_{accelerator.process_index}"
    if not (folder / f"{rng_name}.json").is_file():
        saved = json.loads((folder / MARKER).read_text()).get("processes")
        raise EaselError(
            f"train: {folder} has no RNG state for process {accelerator.process_index}; resume with the number of "
            f"processes it was saved with ({saved})"
        )
    unet_path = folder / UNET_FILE
    if not unet_path.is_file():
        raise EaselError(f"train: {unet_path} is missing; the checkpoint is incomplete")
    check_safetensors(unet_path)
    model = accelerator.unwrap_model(parts.unet)
    device = next(model.parameters()).device
    try:
        model.load_state_dict(load_file(str(unet_path), device=str(device)), strict=True)
    except RuntimeError as exc:
        raise EaselError(f"train: {unet_path} does not fit this U-Net: {str(exc)[:300]}") from None
    parts.optimizer.load_state_dict(load_tree(folder, "optimizer"))
    parts.lr_scheduler.load_state_dict(load_tree(folder, "lr_scheduler"))
    train = load_tree(folder, "train")
    parts.state.load_state_dict(train["state"])
    accelerator.step = int(train["accelerate_step"])
    if accelerator.scaler is not None and train["scaler"] is not None:
        accelerator.scaler.load_state_dict(train["scaler"])
    if parts.ema is not None:
        if not (folder / "ema.json").is_file():
            raise EaselError(f"train: {folder} was saved without an EMA; resume with train.ema.enabled: false")
        parts.ema.load_state_dict(load_tree(folder, "ema"))
    set_rng_states(load_tree(folder, rng_name), parts.state.generator)


def rng_states(generator: torch.Generator) -> dict:
    """This process's random states: what a resumed run must continue from to draw the same numbers."""
    import random

    import numpy as np

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_resume(setting: str | None, run_dir: Path, identity: dict) -> Path | None:
    """The checkpoint to resume from (None: start at step 0). A checkpoint of another run, or in the
    old pickle format, is refused (EaselError, one line naming why)."""
    if setting is None:
        return None
    if setting == "latest":
        found = step_dirs(run_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(setting)
        if not (path / MARKER).is_file():
            raise EaselError(f"train.resume_from_checkpoint: {setting} is not a complete Easel checkpoint")
    try:
        marker = json.loads((path / MARKER).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EaselError(f"train.resume_from_checkpoint: {path / MARKER} is not JSON ({exc})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise EaselError(
            f"train.resume_from_checkpoint: {path} is an older Easel checkpoint in accelerate's pickle files, "
            "which are not read (a pickle can run code); start the run again without resume_from_checkpoint"
        )
    if marker.get("run") != run_dir.name:
        differ = sorted(_differences(marker.get("identity") or {}, identity)) or ["(unknown: no identity saved)"]
        raise EaselError(
            f"train.resume_from_checkpoint: {path} belongs to run {marker.get('run')}, not this run "
            f"({run_dir.name}); what differs: {', '.join(differ[:8])}"
        )
    return path


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            d
            for k in sorted(saved.keys() | current.keys())
            for d in _differences(saved.get(k), current.get(k), f"{where}.{k}" if where else k)
        ]
    return [] if saved == current else [where]
