"""Image generation with an SDXL pipeline and Easel's guidance (components.sdxl.guidance).

The sampling loop is diffusers' StableDiffusionXLPipeline loop written out, so that the guidance
step can use a third branch (dual mode) and switch the negative prompt on part-way (delay). With
`cfg` and no delay it gives the same images as the pipeline itself (tests check this). Every
image gets its own `torch.Generator("cpu").manual_seed(seed)`, so an image depends only on its
(model, prompt, negative prompt, seed, settings), not on what else is in the batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from components.sdxl.guidance import Branch, Guidance
from components.sdxl.prompt_encoding import LongPromptMode, chunks_needed, common_chunk_count, encode_prompts

SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


@dataclass(frozen=True)
class GenerationSettings:
    num_inference_steps: int = 30
    height: int = 1024
    width: int = 1024
    guidance: Guidance = field(default_factory=Guidance)
    sampler: str | None = None  # None: the model's own scheduler
    max_token_length: int = 75  # prompt tokens read: 75, or 150 / 225 chunked (components/sdxl/prompt_encoding.py)
    long_prompt_mode: LongPromptMode = "kohya"  # how long prompts are chunked and joined: kohya | comfyui | a1111

    def key(self) -> str:
        """A stable text form, part of every cached image's key."""
        fields = asdict(self)
        if self.long_prompt_mode == "kohya":  # the encoding from before the setting: images keep their keys
            del fields["long_prompt_mode"]
        return json.dumps(fields, sort_keys=True)


def use_sampler(pipe, sampler: str | None) -> None:
    if sampler is None:
        return
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)


def _embeddings(
    pipe, prompts: list[str], negatives: list[str], max_token_length: int, mode: LongPromptMode = "kohya"
) -> dict[Branch, tuple]:
    """(prompt_embeds, pooled_embeds) for each branch, as StableDiffusionXLPipeline.encode_prompt builds them
    (chunked past 75 tokens as `mode` does); a prompt and its negative get one length: kohya pads the
    shorter with empty chunks, the 77 n modes repeat both to the least common multiple (ComfyUI)."""
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    n = common_chunk_count(chunks_needed(tokenizers, prompts + negatives, max_token_length, mode), mode)
    cond, pooled = encode_prompts(encoders, tokenizers, prompts, max_token_length, n, mode=mode)
    negative, negative_pooled = encode_prompts(encoders, tokenizers, negatives, max_token_length, n, mode=mode)
    if pipe.config.force_zeros_for_empty_prompt:  # SDXL base: the null condition is all zeros
        null, null_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    else:
        null, null_pooled = encode_prompts(encoders, tokenizers, [""] * len(prompts), max_token_length, n, mode=mode)
    dtype = pipe.text_encoder_2.dtype  # as the pipeline hands them to the U-Net
    return {
        branch: (embeds.to(dtype), pooled_embeds.to(dtype))
        for branch, (embeds, pooled_embeds) in {
            "cond": (cond, pooled),
            "negative": (negative, negative_pooled),
            "null": (null, null_pooled),
        }.items()
    }


def _by_chunk_count(
    prompts: list[str], negatives: list[str], tokenizers, max_token_length: int, mode: LongPromptMode = "kohya"
) -> list[list[int]]:
    """Indices grouped by the length each (prompt, negative) is encoded at: an image's conditioning then
    depends on its own prompts only, never on what else is in the batch."""
    need = [
        common_chunk_count(list(pair), mode)
        for pair in zip(
            chunks_needed(tokenizers, prompts, max_token_length, mode),
            chunks_needed(tokenizers, negatives, max_token_length, mode),
            strict=True,
        )
    ]
    return [[i for i, k in enumerate(need) if k == count] for count in sorted(set(need))]


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    negative_prompts: list[str],
    seeds: list[int],
    settings: GenerationSettings,
    output_type: str = "pil",
) -> list[Image.Image]:
    """One image per (prompt, negative prompt, seed): PIL images, or a float array with "np"."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    groups = _by_chunk_count(
        prompts, negative_prompts, tokenizers, settings.max_token_length, settings.long_prompt_mode
    )
    if len(groups) > 1:  # prompts of different lengths are generated apart, then put back in order
        images: list = [None] * len(prompts)
        for group in groups:
            pick = [[values[i] for i in group] for values in (prompts, negative_prompts, seeds)]
            for i, image in zip(group, generate(pipe, *pick, settings, output_type), strict=True):
                images[i] = image
        return images
    n = len(prompts)
    device = pipe._execution_device
    guidance = settings.guidance
    embeds = _embeddings(pipe, prompts, negative_prompts, settings.max_token_length, settings.long_prompt_mode)
    dtype = embeds["cond"][0].dtype
    use_sampler(pipe, settings.sampler)
    timesteps, steps = retrieve_timesteps(pipe.scheduler, settings.num_inference_steps, device)
    latents = pipe.prepare_latents(
        n,
        pipe.unet.config.in_channels,
        settings.height,
        settings.width,
        dtype,
        device,
        [torch.Generator("cpu").manual_seed(s) for s in seeds],
        None,
    )
    size = (settings.height, settings.width)
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    ).to(device)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    for step, t in enumerate(timesteps):
        branches = guidance.branches(step, steps)
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * len(branches)), t)
        prediction = pipe.unet(
            model_input,
            t,
            encoder_hidden_states=torch.cat([embeds[b][0] for b in branches]),
            added_cond_kwargs={
                "text_embeds": torch.cat([embeds[b][1] for b in branches]),
                "time_ids": time_ids.repeat(n * len(branches), 1),
            },
            return_dict=False,
        )[0]
        noise = guidance.combine(dict(zip(branches, prediction.chunk(len(branches)), strict=True)), step, steps)
        latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
    return decode(pipe, latents, output_type)


def decode(pipe, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
    """Latents to PIL images, as the SDXL pipeline does (an fp16 VAE is upcast; it overflows)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    latents = latents.to(next(vae.post_quant_conv.parameters()).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    if pipe.watermark is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type)
