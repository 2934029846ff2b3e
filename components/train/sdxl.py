"""SDXL's training maths: prompt encoding with two text encoders, time ids, noise and loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_prompts(text_encoders, tokenizers, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds), as StableDiffusionXLPipeline.encode_prompt builds them.

    Each encoder's penultimate hidden state, concatenated on the feature axis; the pooled
    projection comes from the second (OpenCLIP bigG) encoder.
    """
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # for CLIPTextModelWithProjection this is text_embeds
        hidden_states.append(out.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), pooled


def time_ids(
    original_sizes: list[tuple[int, int]],
    crop_top_lefts: list[tuple[int, int]],
    target_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """SDXL's micro-conditioning per example: original (h, w) + crop (top, left) + target (h, w)."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crop_top_lefts, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    add_time_ids: torch.Tensor,
) -> torch.Tensor:
    """Noise the latents at random timesteps and regress the scheduler's target (epsilon or v)."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    model_pred = unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_embeds, "time_ids": add_time_ids},
        return_dict=False,
    )[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
