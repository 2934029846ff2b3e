"""Checkpoints: save every N steps, keep the last K, resume exactly.

A checkpoint is accelerate's `save_state` folder (U-Net, optimizer, LR scheduler, RNG states,
and the objects registered for checkpointing: Easel's TrainState and the EMA), plus
`easel_checkpoint.json` naming its step and run. Checkpoints live under
`<checkpoint_dir>/<run id>/step-XXXXXXXX/`, the run id being a hash of everything that defines the
training except how long it runs, so `resume_from_checkpoint: latest` never resumes a different
run.

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
    """What accelerate does not save by itself: the optimizer step and the best validation loss
    (saved by accelerate as a registered object), and this process's generator for noise,
    timesteps and latent samples (saved per process, `easel_generator_<rank>.pt`)."""

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
        self.base_val_loss = state.get("base_val_loss")  # absent from checkpoints written before it existed
        self.last_val_loss = state.get("last_val_loss")


def generator_path(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"easel_generator_{rank}.pt"


def load_generator(checkpoint: Path, rank: int, generator: torch.Generator) -> None:
    path = generator_path(checkpoint, rank)
    if not path.is_file():
        raise EaselError(
            f"train: {checkpoint} has no generator state for process {rank}; resume with the number of "
            "processes it was saved with"
        )
    generator.set_state(torch.load(path, weights_only=True))


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


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    keep: int,
    best_step: int | None = None,
    generator: torch.Generator | None = None,
) -> Path:
    target = run_dir / f"step-{step:08d}"
    partial = run_dir / f".step-{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if generator is not None:
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(generator.get_state(), generator_path(partial, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(partial / MARKER, {"step": step, "run": run_dir.name, "best_step": best_step})
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # complete, or not there: never half a checkpoint under a real name
        for old in step_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        prune_best(run_dir, best_step)
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
