"""Optimizers and learning-rate schedules, as the user's guide names them.

- adamw: torch.optim.AdamW; with `full_bf16` or `fused_backward_pass`, Easel's `AdamW` below (the
  same update, computed per parameter in fp32 and written back with stochastic rounding);
- adamw8bit: bitsandbytes' AdamW8bit, where bitsandbytes is installed (a CUDA GPU);
- adafactor: transformers' Adafactor algorithm (Easel's subclass below: the same update, one
  parameter at a time, written back with stochastic rounding), with `optimizer_args` such as
  clip_threshold (the guide's default 1.0), relative_step, scale_parameter, warmup_init,
  weight_decay. With relative_step the learning rate is Adafactor's own, and the configured one is
  not used.
Schedules come from diffusers.optimization.get_scheduler (constant, constant_with_warmup,
linear, cosine, cosine_with_restarts, polynomial) with `lr_scheduler_args` (num_cycles, power).

Both of Easel's optimizers keep their state in fp32 whatever the weights' dtype, and `step_param`
lets `memory.FusedBackward` step one parameter from inside backward.
"""

from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor as TransformersAdafactor

from components.config import TrainParams
from components.plumbing.errors import EaselError
from components.train.memory import RoundingNoise


class _PerParameter:
    """What Easel's optimizers share: a stable index per parameter (it seeds the rounding noise), a
    step that visits every parameter with a gradient, and fp32 state that survives a checkpoint."""

    def _index_parameters(self, seed: int) -> None:
        self.noise = RoundingNoise(seed)
        self.index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to the parameter's dtype on load; moments of bf16 weights
        # are kept in fp32 here, so they are put back as saved.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for param, saved_id in zip(params, saved_ids, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    self.state[param][key] = value.to(param.device)


class AdamW(_PerParameter, torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments), per parameter,
    computed in fp32 and stored with stochastic rounding when the weight is bf16."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, seed=0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._index_parameters(seed)

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        step, (beta1, beta2), lr = state["step"], group["betas"], group["lr"]
        weight = p.float() if p.dtype != torch.float32 else p
        weight.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        weight.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
        self.noise.write(p, weight, self.index[p], step)


class Adafactor(_PerParameter, TransformersAdafactor):
    """transformers' Adafactor, one parameter at a time; bf16 weights are written back with
    stochastic rounding instead of transformers' round-to-nearest copy.

    `factored_dims="largest_two"` factors the second moment over a weight's two largest dimensions,
    as Mesh-TF and optax do (not when the smaller of them is under 128), instead of its last two:
    for SDXL's 3x3 convolutions that is the output and input channels, which cuts the optimizer
    state from 0.96 GB to a few MB. The maths is transformers' with those two dimensions moved last."""

    MIN_DIM_TO_FACTOR = 128  # optax's and Mesh-TF's min_dim_size_to_factor

    def __init__(self, params, seed: int = 0, factored_dims: str = "last_two", **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.defaults["factored_dims"] = factored_dims
        for group in self.param_groups:
            group.setdefault("factored_dims", factored_dims)
        self._index_parameters(seed)

    def _factored_pair(self, group: dict, shape: torch.Size) -> tuple[int, int] | None:
        """The two dimensions to factor over (in order), or None for a full second moment."""
        if len(shape) < 2:
            return None
        if group["factored_dims"] == "last_two":
            return len(shape) - 2, len(shape) - 1
        second, largest = sorted(range(len(shape)), key=lambda i: shape[i])[-2:]
        return None if shape[second] < self.MIN_DIM_TO_FACTOR else tuple(sorted((second, largest)))

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict) -> None:
        pair = self._factored_pair(group, p.shape)
        # The factored dimensions moved last (a view; nothing moves when they are the last two).
        grad = p.grad.float() if pair is None else p.grad.float().movedim(pair, (-2, -1))
        state = self.state[p]
        use_first_moment = group["beta1"] is not None
        if not state:
            state["step"] = 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if pair is not None:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        state["step"] += 1
        state["RMS"] = self._rms(p if p.dtype == torch.float32 else p.float())
        lr = self._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        # Each fp32 temporary is freed as soon as it is used (at SDXL's largest kernel they are
        # 118 MB apiece), and the weight's fp32 copy is made last.
        update = grad.square().add_(group["eps"][0])
        if pair is not None:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            del update
            update = self._approx_sq_grad(row, col).mul_(grad)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            del update
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        del grad
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if use_first_moment:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        if pair is not None:
            update = update.movedim((-2, -1), pair)
        weight = p.float() if p.dtype != torch.float32 else p
        if group["weight_decay"] != 0:
            weight.add_(weight, alpha=-group["weight_decay"] * lr)
        weight.sub_(update)
        del update
        self.noise.write(p, weight, self.index[p], state["step"])


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
        if params.full_bf16 or params.fused_backward_pass:
            return AdamW(parameters, lr=params.learning_rate, seed=params.seed, **args)
        return torch.optim.AdamW(parameters, lr=params.learning_rate, **args)
    unknown = set(args) - {
        "weight_decay",
        "clip_threshold",
        "relative_step",
        "scale_parameter",
        "warmup_init",
        "eps",
        "factored_dims",
    }
    if unknown:
        raise EaselError(f"params.yaml: train.optimizer_args: {sorted(unknown)} do not apply to adafactor")
    args = {"clip_threshold": 1.0, "relative_step": False, "scale_parameter": False, "warmup_init": False} | args
    if "eps" in args:
        args["eps"] = (args["eps"], 1e-3)
    return Adafactor(parameters, lr=None if args["relative_step"] else params.learning_rate, seed=params.seed, **args)


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
