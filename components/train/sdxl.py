"""SDXL's training maths: prompt encoding, size conditioning, noise, timesteps, loss weighting.

- noise offset (Guttenberg, "Diffusion with offset noise"): noise + offset * N(0, 1) per
  (sample, channel), broadcast over the pixels, so the model can learn overall brightness;
- min-SNR-gamma (Hang et al. 2023): each timestep's loss is weighted by min(SNR, gamma) / SNR
  for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v-prediction, with
  SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]);
- timesteps drawn uniformly from [min_timestep, max_timestep).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.sdxl.prompt_encoding import LongPromptMode
from components.sdxl.prompt_encoding import encode_prompts as encode_text


def encode_prompts(
    text_encoders,
    tokenizers,
    captions: list[str],
    empty: str = "zeros",
    max_token_length: int = 75,
    n_chunks: int | None = None,
    mode: LongPromptMode = "kohya",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of training captions, as StableDiffusionXLPipeline.encode_prompt
    builds them (chunked past 75 tokens as `mode` does: components/sdxl/prompt_encoding.py).

    An empty caption (dropped for CFG) is conditioned like the pipeline's unconditional branch:
    all-zero embeddings with `empty="zeros"` (SDXL's force_zeros_for_empty_prompt), else "" encoded.
    """
    return encode_text(
        text_encoders, tokenizers, captions, max_token_length, n_chunks, zero_empty=empty == "zeros", mode=mode
    )


def time_ids(
    original_sizes: list[tuple[int, int]],
    crop_top_lefts: list[tuple[int, int]],
    target_sizes: list[tuple[int, int]],
    device: torch.device,
) -> torch.Tensor:
    """SDXL's micro-conditioning per example: original (h, w) + crop (top, left) + target (h, w).

    Always float32, whatever the training precision: the U-Net embeds them in float32 anyway, and
    bf16 holds integers exactly only up to 256 (777 would become 776)."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes, strict=True)]
    return torch.tensor(rows, device=device, dtype=torch.float32)


def offset_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like the latents, plus noise_offset * N(0, 1) per (sample, channel).

    Drawn on the generator's device (the CPU) and moved, so a run draws the same numbers on any
    device and a resumed run continues the same sequence."""
    source = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=source, dtype=torch.float32)
    if noise_offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=source)
        noise = noise + noise_offset * shift
    return noise.to(latents.device, latents.dtype)


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    s = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    add_time_ids: torch.Tensor,
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    timestep_range: tuple[int, int] = (0, 1000),
    generator: torch.Generator | None = None,
    input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Noise the latents at random timesteps and regress the scheduler's target (epsilon or v).

    The noising and the target are computed in float32 and only the U-Net's input is cast to
    `input_dtype` (default: the latents' dtype): diffusers' add_noise casts alphas_cumprod to the
    latents' dtype, and in bf16 the first timesteps' alphas_cumprod round to 1, so they would get
    no noise at all."""
    input_dtype = input_dtype or latents.dtype
    latents = latents.float()
    noise = offset_noise(latents, noise_offset, generator)
    source = generator.device if generator is not None else latents.device
    timesteps = (
        torch.randint(timestep_range[0], timestep_range[1], (latents.shape[0],), device=source, generator=generator)
        .long()
        .to(latents.device)
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    model_pred = unet(
        noisy.to(input_dtype),
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_embeds, "time_ids": add_time_ids},
        return_dict=False,
    )[0]
    if min_snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma, prediction_type)).mean()
