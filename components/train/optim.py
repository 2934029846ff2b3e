"""Optimizers and learning-rate schedules, as the user's guide names them.

- adamw: torch.optim.AdamW;
- adamw8bit: bitsandbytes' AdamW8bit, where bitsandbytes is installed (a CUDA GPU);
- adafactor: transformers' Adafactor, with `optimizer_args` such as clip_threshold (the guide's
  default 1.0), relative_step, scale_parameter, warmup_init, weight_decay. With relative_step
  the learning rate is Adafactor's own, and the configured one is not used.
Schedules come from diffusers.optimization.get_scheduler (constant, constant_with_warmup,
linear, cosine, cosine_with_restarts, polynomial) with `lr_scheduler_args` (num_cycles, power).
"""

from __future__ import annotations

import torch

from components.config import TrainParams
from components.errors import EaselError


def build_optimizer(parameters, params: TrainParams) -> torch.optim.Optimizer:
    args = {k: v for k, v in params.optimizer_args.model_dump().items() if v is not None}
    if params.optimizer in ("adamw", "adamw8bit"):
        unknown = set(args) - {"weight_decay", "betas", "eps"}
        if unknown:
            raise EaselError(f"params.yaml: train.optimizer_args: {sorted(unknown)} do not apply to {params.optimizer}")
        if params.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise EaselError(
                    "train.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA)"
                ) from None
            return bnb.optim.AdamW8bit(parameters, lr=params.learning_rate, **args)
        return torch.optim.AdamW(parameters, lr=params.learning_rate, **args)
    from transformers.optimization import Adafactor

    unknown = set(args) - {"weight_decay", "clip_threshold", "relative_step", "scale_parameter", "warmup_init", "eps"}
    if unknown:
        raise EaselError(f"params.yaml: train.optimizer_args: {sorted(unknown)} do not apply to adafactor")
    args = {"clip_threshold": 1.0, "relative_step": False, "scale_parameter": False, "warmup_init": False} | args
    if "eps" in args:
        args["eps"] = (args["eps"], 1e-3)
    return Adafactor(parameters, lr=None if args["relative_step"] else params.learning_rate, **args)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams, num_processes: int = 1):
    if params.optimizer == "adafactor" and params.optimizer_args.relative_step:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    extra = {k: v for k, v in params.lr_scheduler_args.model_dump().items() if v is not None}
    return get_scheduler(
        params.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=params.lr_warmup_steps * num_processes,
        num_training_steps=params.max_train_steps * num_processes,
        **extra,
    )
