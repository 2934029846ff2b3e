"""The training loop: accelerate for devices and precision, dvclive for curves, a diffusers save.

The same loop runs on a CPU (the offline demo and tests, with the tiny model) and on one or many
GPUs under `accelerate launch` (see infra/accelerate/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from components.config import ModelsParams, TrainParams
from components.errors import EaselError
from components.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from components.models.loaders import dtype_for, load_sdxl_parts
from components.train.data import CaptionedImages, ImageCaption, collate
from components.train.sdxl import diffusion_loss, encode_prompts, time_ids

log = logging.getLogger(__name__)

MAX_STEPS_WARNING = 5000  # the EMU paper's tip, quoted by the user's guide: more over-fits


@dataclass
class TrainSummary:
    steps: int
    final_loss: float
    mean_loss_last_10: float
    seconds: float
    images_per_second: float
    model_dir: Path


def load_training_items(caption_dir: Path) -> list[ImageCaption]:
    table_path = caption_dir / "captions.parquet"
    if not table_path.is_file():
        raise EaselError(f"train: {table_path} not found; run the caption stage first")
    table = pd.read_parquet(table_path)
    if table.empty:
        raise EaselError(f"train: {table_path} holds no captioned images; nothing to train on")
    return [ImageCaption(Path(r.image_path), r.caption, r.sha256) for r in table.itertuples()]


def data_fingerprint(items: list[ImageCaption]) -> str:
    """A hash of exactly what was trained on: image hashes and their captions."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.sha256):
        digest.update(f"{item.sha256}\t{item.caption}\n".encode())
    return digest.hexdigest()


def save_pipeline(parts, unet, out_dir: Path) -> None:
    """Write a diffusers StableDiffusionXLPipeline folder with the trained U-Net (safetensors)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_pretrained(parts.base, subfolder="scheduler")
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


def model_card(params: TrainParams, models: ModelsParams, fingerprint: str, n_images: int, summary: dict) -> str:
    return "\n".join(
        [
            "---",
            "library_name: diffusers",
            "pipeline_tag: text-to-image",
            f"base_model: {models.sdxl}",
            "tags: [stable-diffusion-xl, easel, full-fine-tune]",
            "---",
            "# Easel SDXL fine-tune",
            "",
            f"- base model: `{models.sdxl}`" + (f" (VAE `{models.vae}`)" if models.vae else ""),
            f"- training data: {n_images} captioned images, fingerprint `{fingerprint}`",
            f"- steps: {summary['steps']}, final loss {summary['final_loss']:.5f}",
            "",
            "## Training parameters",
            "```json",
            json.dumps(params.model_dump(), indent=2),
            "```",
            "",
        ]
    )


def run_train(
    params: TrainParams,
    models: ModelsParams,
    caption_dir: Path,
    metrics_path: Path | None = None,
    plots_dir: Path | None = None,
    progress: bool = True,
) -> TrainSummary:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    if params.max_train_steps > MAX_STEPS_WARNING:
        log.warning(
            "train.max_train_steps = %d: the EMU paper (quoted in the guide) saw quality-tuning over-fit "
            "beyond about %d steps",
            params.max_train_steps,
            MAX_STEPS_WARNING,
        )
    items = load_training_items(caption_dir)
    accelerator = Accelerator(
        mixed_precision=params.mixed_precision, gradient_accumulation_steps=params.gradient_accumulation_steps
    )
    set_seed(params.seed)
    parts = load_sdxl_parts(models)
    weight_dtype = dtype_for(params.mixed_precision)
    unet = parts.unet
    for frozen in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        frozen.requires_grad_(False)
        frozen.eval()
    # SDXL's VAE overflows in fp16; it stays float32 (an fp16-fixed VAE can be set as models.vae).
    parts.vae.to(accelerator.device, dtype=torch.float32)
    parts.text_encoder.to(accelerator.device, dtype=weight_dtype)
    parts.text_encoder_2.to(accelerator.device, dtype=weight_dtype)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    dataset = CaptionedImages(items, params.resolution, params.center_crop, params.random_flip, params.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=params.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(params.seed),
        drop_last=len(dataset) >= params.train_batch_size,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate, weight_decay=params.adam_weight_decay)
    lr_scheduler = get_scheduler(
        params.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=params.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=params.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    live = None
    if plots_dir is not None and accelerator.is_main_process:
        from dvclive import Live

        live = Live(dir=str(plots_dir), save_dvc_exp=False, dvcyaml=False, report=None)

    target_size = (params.resolution, params.resolution)
    losses: list[float] = []
    step = 0
    start = time.perf_counter()
    bar = tqdm(total=params.max_train_steps, desc="train", unit="step", disable=not progress)
    step_start = time.perf_counter()
    while step < params.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(accelerator.device, dtype=torch.float32)
                    latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
                    latents = latents.to(weight_dtype)
                    prompt_embeds, pooled = encode_prompts(
                        [parts.text_encoder, parts.text_encoder_2],
                        [parts.tokenizer, parts.tokenizer_2],
                        batch["captions"],
                    )
                add_time_ids = time_ids(
                    batch["original_sizes"],
                    batch["crop_top_lefts"],
                    target_size,
                    accelerator.device,
                    weight_dtype,
                )
                loss = diffusion_loss(unet, parts.noise_scheduler, latents, prompt_embeds, pooled, add_time_ids)
                if not math.isfinite(loss.item()):
                    raise EaselError(
                        f"train: the loss became {loss.item()} at step {step + 1}; lower train.learning_rate "
                        "or use bf16 instead of fp16. Nothing was saved from this run."
                    )
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), params.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(loss.item())
            now = time.perf_counter()
            step_time, step_start = now - step_start, now
            if live is not None:
                live.log_metric("train/loss", losses[-1])
                live.log_metric("train/lr", lr_scheduler.get_last_lr()[0])
                if grad_norm is not None:
                    live.log_metric("train/grad_norm", float(grad_norm))
                live.log_metric("train/step_seconds", step_time)
                live.log_metric(
                    "train/images_per_second",
                    params.train_batch_size * params.gradient_accumulation_steps / max(step_time, 1e-9),
                )
                live.next_step()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step >= params.max_train_steps:
                break
    bar.close()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()

    model_dir = Path(params.out_dir) / "model"
    summary = {
        "steps": step,
        "final_loss": losses[-1],
        "mean_loss_last_10": float(sum(losses[-10:]) / len(losses[-10:])),
        "seconds": round(seconds, 2),
        "images_per_second": round(step * params.train_batch_size * params.gradient_accumulation_steps / seconds, 3),
    }
    if accelerator.is_main_process:
        fingerprint = data_fingerprint(items)
        with atomic_dir(model_dir) as tmp:
            save_pipeline(parts, accelerator.unwrap_model(unet), tmp)
            atomic_write_text(tmp / "README.md", model_card(params, models, fingerprint, len(items), summary))
            # Only what determines the weights goes in the model folder (no timings), so the same
            # training gives the same registry version.
            atomic_write_json(
                tmp / "easel_train.json",
                {
                    "base_model": models.sdxl,
                    "data_fingerprint": fingerprint,
                    "images": len(items),
                    "steps": step,
                    "final_loss": summary["final_loss"],
                },
            )
        if metrics_path is not None:
            atomic_write_json(metrics_path, summary)
        if live is not None:
            live.end()
    return TrainSummary(
        step,
        summary["final_loss"],
        summary["mean_loss_last_10"],
        seconds,
        summary["images_per_second"],
        model_dir,
    )
