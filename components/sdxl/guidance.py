"""Classifier-free guidance with a negative prompt: the two forms of the user's second document.

With eps(y) the noise prediction for the prompt, eps(y~) for the negative prompt and eps(0) for
the null condition (for SDXL, all-zero text embeddings):

  cfg  (eq. 9, what diffusers does):  eps = eps(y~) + s * (eps(y) - eps(y~))
  dual (eq. 8, separate scales):      eps = eps(0) + s+ * (eps(y) - eps(0)) - s- * (eps(y~) - eps(0))

The two agree exactly when s- = s+ - 1; `dual` with s- = 0 is plain CFG without a negative
prompt. `dual` needs a third U-Net pass per step.

Negative prompts act late in sampling (their attention peaks around steps 5-10), so a negative
delay keeps the negative prompt out of the first `negative_delay` fraction of the steps: before
it, `cfg` guides against eps(0) and `dual` drops the s- term. Delay 0 is no delay; delay 1 means
the negative prompt is never used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Branch = Literal["null", "cond", "negative"]


@dataclass(frozen=True)
class Guidance:
    mode: Literal["cfg", "dual"] = "cfg"
    scale: float = 5.0  # s in cfg, s+ in dual
    negative_scale: float | None = None  # s- in dual; None means s+ - 1 (the value that equals cfg)
    negative_delay: float = 0.0  # fraction of the steps before the negative prompt takes effect

    def __post_init__(self) -> None:
        if self.mode not in ("cfg", "dual"):
            raise ValueError(f"guidance mode must be cfg or dual, not {self.mode!r}")
        if not 0.0 <= self.negative_delay <= 1.0:
            raise ValueError(f"negative_delay must be in [0, 1], not {self.negative_delay}")

    @property
    def s_minus(self) -> float:
        return self.scale - 1.0 if self.negative_scale is None else self.negative_scale

    def negative_active(self, step: int, num_steps: int) -> bool:
        """Whether the negative prompt is used at this step (0-based)."""
        return step >= math.ceil(self.negative_delay * num_steps)

    def branches(self, step: int, num_steps: int) -> tuple[Branch, ...]:
        """The noise predictions this step needs, in the order they are batched through the U-Net."""
        active = self.negative_active(step, num_steps)
        if self.mode == "cfg":
            return ("negative", "cond") if active else ("null", "cond")
        return ("null", "cond", "negative") if active else ("null", "cond")

    def combine(self, predictions: dict[Branch, torch.Tensor], step: int, num_steps: int) -> torch.Tensor:
        cond = predictions["cond"]
        active = self.negative_active(step, num_steps)
        if self.mode == "cfg":
            uncond = predictions["negative"] if active else predictions["null"]
            return uncond + self.scale * (cond - uncond)
        null = predictions["null"]
        guided = null + self.scale * (cond - null)
        if active:
            guided = guided - self.s_minus * (predictions["negative"] - null)
        return guided

    def describe(self) -> str:
        delay = f", negative prompt from {self.negative_delay:.0%} of the steps" if self.negative_delay else ""
        if self.mode == "cfg":
            return f"cfg (eq. 9), s = {self.scale:g}{delay}"
        return f"dual (eq. 8), s+ = {self.scale:g}, s- = {self.s_minus:g}{delay}"
