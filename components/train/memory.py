"""Memory strategies that fit the full SDXL U-Net on one ordinary GPU, kept out of the loop.

The arithmetic (2.57 B parameters): accelerate's `mixed_precision: bf16` keeps fp32 weights and fp32
gradients, 10.3 + 10.3 GB before optimizer state and activations. What this module offers against it:

- **Stochastic rounding** (`stochastic_round_`), for `full_bf16`: weights live in bf16 (5.1 GB) and
  every update is computed in fp32, then rounded to one of its two neighbouring bf16 values at random,
  in proportion to how close it is to each. bf16 keeps 8 significant bits, so at a weight of 0.05 its
  spacing is about 2.4e-4 and an update of 4e-7 (SDXL's learning rates) would round back to the same
  weight every time; rounded stochastically, the weight moves by the update in expectation. The noise
  is seeded by (seed, parameter, step), so a resumed run draws exactly what an uninterrupted one does.
- **Fused backward pass** (`FusedBackward`): the optimizer steps each parameter from a
  `register_post_accumulate_grad_hook`, as soon as its gradient is complete, and frees that gradient.
  The gradients never all exist at once (5.1 GB less in bf16). What it cannot do, and the config
  refuses: gradient accumulation (each micro-batch's gradient would be applied at once), clipping by
  the global norm (known only after the last parameter is updated), fp16 loss scaling, and several
  processes (DDP averages a gradient after this hook has already used it).
- **EMA placement** (`EMA`): the averaged weights on the accelerator or in CPU memory, in float32 or
  bf16 (stochastically rounded too), updated every `update_every` steps. Built from the U-Net's
  parameters after `accelerator.prepare` has moved them, so it is on the right device.
- **Frozen parts** (`FrozenParts`): the VAE and text encoders, which cached latents and embeddings take
  out of the loop, are moved off the accelerator (released entirely when training on the CPU, where
  "off the device" frees nothing) and brought back only while samples are drawn or the model is saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import resource
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from components.plumbing.errors import EaselError

BF16_DROPPED_BITS = 16  # bf16 is the top 16 bits of an fp32 number


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory`: allocated device memory on a GPU, the
    process's resident memory (RSS high-water mark) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system. glibc keeps freed
    blocks under 32 MB (most of a model's tensors) in its heap, so without this the resident size
    after loading and caching stays at its peak although the memory is free."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak afresh, so that training's peak is not loading's. On Linux, writing 5 to
    /proc/self/clear_refs resets the RSS high-water mark that getrusage reports; where that is not
    allowed, the CPU peak keeps counting from the process start."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_memory()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `value` into bf16 `target`, rounding up with probability equal to the distance to the
    value below (in units of bf16's spacing there): uniform random low bits are added to the fp32 bit
    pattern, then cut off. `value` is used as scratch space and left changed."""
    if target.dtype != torch.bfloat16:
        target.copy_(value)
        return
    bits = value.view(torch.int32)
    noise = torch.randint(
        0, 1 << BF16_DROPPED_BITS, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    # In two's complement, adding to the pattern grows the magnitude of negative numbers too, so both
    # signs round away from zero with the right probability; the mask then truncates towards zero.
    bits.add_(noise).bitwise_and_(-(1 << BF16_DROPPED_BITS))
    target.copy_(value)  # exact: the low 16 bits are zero now


class RoundingNoise:
    """Generators for stochastic rounding, one per device, re-seeded from (seed, tensor index, step)
    for each write, so the noise needs no state of its own in checkpoints."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device, index: int, step: int) -> torch.Generator:
        generator = self.generators.get(device)
        if generator is None:
            generator = self.generators[device] = torch.Generator(device=device)
        digest = hashlib.blake2b(f"{self.seed}:{index}:{step}".encode(), digest_size=8).digest()
        return generator.manual_seed(int.from_bytes(digest, "little") >> 1)

    def write(self, target: torch.Tensor, value: torch.Tensor, index: int, step: int) -> None:
        """Store the fp32 result `value` in `target`: stochastically rounded for bf16, exactly otherwise."""
        if target.dtype == torch.bfloat16:
            stochastic_round_(target, value.contiguous(), self.generator(target.device, index, step))
        elif value is not target:
            target.copy_(value)


class FusedBackward:
    """Steps each parameter from inside backward, as soon as its gradient is accumulated, then frees
    the gradient. The optimizer must offer `step_param(p, group)` (Easel's AdamW and Adafactor do).

    The squared gradient norms are summed on the way, so the global norm is still logged (it cannot
    be clipped by: see the module docstring). A parameter that receives a second gradient in the same
    backward (a parameter used twice under re-entrant checkpointing) would be stepped twice, with two
    partial gradients; that is refused instead."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor]) -> None:
        if not hasattr(optimizer, "step_param"):
            raise EaselError(f"train.fused_backward_pass: {type(optimizer).__name__} cannot step one parameter")
        self.optimizer = optimizer
        self.group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
        self.stepped: set[torch.Tensor] = set()
        self.squared_norm: torch.Tensor | None = None
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in parameters if p.requires_grad]

    def _step(self, param: torch.Tensor) -> None:
        if param in self.stepped:
            raise EaselError(
                "train.fused_backward_pass: a parameter received two gradients in one backward pass; "
                "turn fused_backward_pass off for this model"
            )
        self.stepped.add(param)
        squared = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32).square()
        self.squared_norm = squared if self.squared_norm is None else self.squared_norm + squared
        self.optimizer.step_param(param, self.group_of[param])
        param.grad = None
        # The LR scheduler warns when it is stepped before the optimizer ever was; here the optimizer
        # steps inside backward, never through step(), which that check does not know.
        self.optimizer._opt_called = True

    def finish_step(self) -> float | None:
        """The step's global gradient norm (None when no gradient came); ready for the next step."""
        norm = None if self.squared_norm is None else float(self.squared_norm.sqrt())
        self.stepped.clear()
        self.squared_norm = None
        return norm

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def ema_decay(decay: float, update: int, warmup: bool) -> float:
    """The share of the average kept by EMA update `update` (1-based). The first copies the weights
    (0). With `warmup`, update n after the copy keeps min(decay, (1 + n) / (10 + n)) (diffusers'
    EMAModel and OneTrainer), which reaches `decay` only after (10 decay - 1) / (1 - decay) updates:
    for 0.999, 8,990 updates."""
    since_copy = update - 1
    if since_copy <= 0:
        return 0.0
    return min(decay, (1 + since_copy) / (10 + since_copy)) if warmup else decay


def ema_horizon_steps(decay: float, update_every: int, warmup: bool, steps: int) -> dict[str, float]:
    """How far back the EMA of a run of `steps` optimizer steps looks when the run ends, in steps.

    `horizon_steps` is the time constant of the last update, update_every / (1 - its decay): weights
    that many steps old count e times less than the newest. `set_horizon_steps` is the same for
    the set decay, which a warm-up may not have reached; `first_update_share` is how much of the
    final average is still the weights of the first update (near the base model's; with no update
    the average is the base model)."""
    updates = steps // update_every
    final = ema_decay(decay, updates, warmup) if updates > 1 else 0.0
    share = 1.0
    for update in range(2, updates + 1):
        share *= ema_decay(decay, update, warmup)
    return {
        "horizon_steps": update_every / (1.0 - final),
        "set_horizon_steps": update_every / (1.0 - decay),
        "first_update_share": share,
    }


class EMA:
    """An exponential moving average of the trained parameters, on a chosen device and dtype.

    The first update copies the weights; each later one keeps `ema_decay(...)` of the average
    (`warmup`: diffusers' `EMAModel` schedule, so the averages match it). With `update_every` k the
    average is updated every k optimizer steps, which lengthens its horizon k times: see
    `ema_horizon_steps`. On the CPU the parameters are copied over first, one at a time, so only one
    parameter's copy is in flight."""

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        decay: float,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        warmup: bool = True,
    ) -> None:
        self.decay, self.warmup = decay, warmup
        self.device, self.dtype = torch.device(device), dtype
        self.shadow = [p.detach().to(self.device, dtype, copy=True) for p in parameters]
        self.updates = 0
        self.noise = RoundingNoise(seed)

    def current_decay(self) -> float:
        return ema_decay(self.decay, self.updates, self.warmup)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        for index, (shadow, param) in enumerate(zip(self.shadow, parameters, strict=True)):
            average = shadow.float() if shadow.dtype != torch.float32 else shadow
            average.lerp_(param.detach().to(self.device, torch.float32), weight)
            self.noise.write(shadow, average, index, self.updates)

    def weights(self) -> list[torch.Tensor]:
        """The averaged parameters, in the order they were given."""
        return self.shadow

    @contextlib.contextmanager
    def applied_to(self, parameters: Iterable[torch.Tensor]):
        """The averaged weights in `parameters` for the duration; the trained ones wait in CPU memory
        (diffusers' EMAModel.store/restore) and come back bit for bit."""
        parameters = list(parameters)
        stored = [p.detach().to("cpu", copy=True) for p in parameters]
        try:
            with torch.no_grad():
                for param, shadow in zip(parameters, self.shadow, strict=True):
                    param.copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(parameters, stored, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)


class FrozenParts:
    """Where the VAE and the text encoders are, and bringing them back when they are needed.

    The training loop needs the VAE only without cached latents and the encoders only without cached
    embeddings. Once the caches are filled, the unneeded parts leave the accelerator: to CPU memory,
    or, when the accelerator is the CPU itself, out of memory altogether (`reload` loads them again
    from the model files). `on_device()` puts all of them beside the U-Net for as long as samples are
    drawn, then back where they were. The save loads them again from the base files, unrounded."""

    NAMES = ("vae", "text_encoder", "text_encoder_2")

    def __init__(self, parts, device: torch.device, encoder_dtype: torch.dtype, reload: Callable[[], tuple]) -> None:
        self.parts = parts
        self.device = device
        self.encoder_dtype = encoder_dtype
        self.reload = reload
        self.away: set[str] = set()

    def _move(self, name: str, module: torch.nn.Module, device) -> None:
        # SDXL's VAE overflows in fp16; it stays float32 as loaded (an fp16-fixed VAE can be set as
        # models.vae). The encoders compute in the training precision.
        if name == "vae":
            module.to(device)
        else:
            module.to(device, dtype=self.encoder_dtype)

    def place(self, names: Iterable[str]) -> None:
        for name in names:
            if getattr(self.parts, name) is None:
                self._load()
            self._move(name, getattr(self.parts, name), self.device)
            self.away.discard(name)

    def send_away(self, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            if self.device.type == "cpu":
                setattr(self.parts, name, None)  # nothing to offload to: free the memory itself
            else:
                getattr(self.parts, name).to("cpu")
            self.away.add(name)
        if names and self.device.type == "cpu":
            release_freed_memory()

    def _load(self) -> None:
        modules = self.reload()
        for name, module in zip(self.NAMES, modules, strict=True):
            if getattr(self.parts, name) is None:
                module.requires_grad_(False)
                module.eval()
                setattr(self.parts, name, module)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        away = sorted(self.away)
        self.place(away)
        try:
            yield
        finally:
            self.send_away(away)
