"""Checkpoints: save every N steps, keep the last K, resume exactly.

A checkpoint is accelerate's `save_state` folder (U-Net, optimizer, LR scheduler, RNG states,
and the objects registered for checkpointing: Easel's TrainState and the EMA), plus
`easel_checkpoint.json` naming its step and run. Checkpoints live under
`<checkpoint_dir>/<run id>/step-XXXXXXXX/`, the run id being a hash of everything that defines the
training except how long it runs, so `resume_from_checkpoint: latest` never resumes a different
run. `best/` holds the weights with the lowest validation loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from components.config import ModelsParams, TrainParams
from components.errors import EaselError
from components.fsutil import atomic_write_json

MARKER = "easel_checkpoint.json"
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
    """What accelerate does not save by itself: the optimizer step, the best validation loss, and
    the generator that draws noise, timesteps and latent samples."""

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = state["best_step"]
        self.generator.set_state(state["generator"])


def run_id(params: TrainParams, models: ModelsParams, data_fingerprint: str) -> str:
    identity = {k: v for k, v in params.model_dump().items() if k not in NOT_IDENTITY}
    identity["validation"] = {"fraction": params.validation.fraction}
    payload = json.dumps(
        {"train": identity, "models": models.model_dump(), "data": data_fingerprint}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def step_dirs(run_dir: Path) -> list[Path]:
    """This run's complete checkpoints, oldest first (a folder without its marker is unfinished)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    target = run_dir / f"step-{step:08d}"
    partial = run_dir / f".step-{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        atomic_write_json(partial / MARKER, {"step": step, "run": run_dir.name})
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # complete, or not there: never half a checkpoint under a real name
        for old in step_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def resolve_resume(setting: str | None, run_dir: Path) -> Path | None:
    if setting is None:
        return None
    if setting == "latest":
        found = step_dirs(run_dir)
        return found[-1] if found else None
    path = Path(setting)
    if not (path / MARKER).is_file():
        raise EaselError(f"train.resume_from_checkpoint: {setting} is not a complete Easel checkpoint")
    return path
