"""The training loop: accelerate for devices and precision, dvclive for curves, a diffusers save.

The same loop runs on a CPU (the offline demo and tests, with the tiny model) and on one or many
GPUs under `accelerate launch` (infra/accelerate/). What it does per optimizer step: latents
(from the VAE, or from the latent cache), text embeddings (from the encoders, or their cache),
noise with an optional offset at timesteps from the configured range, the U-Net's prediction,
an MSE loss (min-SNR weighted if set), backward, clipping, optimizer and LR scheduler, EMA; then
logging, checkpoints, validation loss and sample images on their schedules. The memory options
(`full_bf16`, `fused_backward_pass`, EMA placement, frozen parts off the device) are in memory.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config import ModelsParams, TrainParams
from components.images import read_header
from components.models.loaders import dtype_for, load_sdxl_frozen, load_sdxl_parts
from components.plumbing.errors import ConfigError, EaselError
from components.plumbing.fsutil import atomic_dir, atomic_write_json, atomic_write_text, read_stage_table
from components.sdxl.prompt_encoding import chunks_needed, common_chunk_count
from components.train import checkpoints
from components.train.cache import LatentCache, TextEmbeddingCache, folder_identity
from components.train.data import (
    BucketBatchSampler,
    CaptionedImages,
    ImageCaption,
    assign_bucket,
    collate,
    make_buckets,
)
from components.train.memory import (
    EMA,
    FrozenParts,
    FusedBackward,
    ema_horizon_steps,
    peak_memory_mb,
    reset_peak_memory,
)
from components.train.optim import build_lr_scheduler, build_optimizer
from components.train.plan import TrainPlan, check_disk, plan_training
from components.train.sdxl import diffusion_loss, encode_prompts, time_ids

log = logging.getLogger(__name__)

MAX_STEPS_WARNING = 5000  # the EMU paper's tip, quoted by the user's guide: more over-fits
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainSummary:
    steps: int
    final_loss: float
    mean_loss_last_10: float
    best_val_loss: float | None
    seconds: float
    images_per_second: float
    model_dir: Path


def load_training_items(caption_dir: Path) -> list[ImageCaption]:
    table_path = caption_dir / "captions.parquet"
    table = read_stage_table(table_path, "train", "caption", "captioned images", ("sha256", "image_path", "caption"))
    items = []
    for r in table.itertuples():
        header = read_header(Path(r.image_path))
        if header.error:
            raise EaselError(f"train: {r.image_path}: {header.error}")
        items.append(ImageCaption(Path(r.image_path), r.caption, r.sha256, header.width, header.height))
    return items


def data_fingerprint(items: list[ImageCaption]) -> str:
    """A hash of exactly what was trained on: image hashes and their captions."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.sha256):
        digest.update(f"{item.sha256}\t{item.caption}\n".encode())
    return digest.hexdigest()


def split_validation(items: list[ImageCaption], fraction: float) -> tuple[list[ImageCaption], list[ImageCaption]]:
    """A stable held-out set: the images whose sha256 sorts first, about `fraction` of them."""
    if not fraction:
        return items, []
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(sorted(i.sha256 for i in items)[:count])
    return [i for i in items if i.sha256 not in held], [i for i in items if i.sha256 in held]


class CurveLog:
    """Per-step metrics for dvclive, written every `every` steps.

    dvclive's next_step rewrites the summary by re-reading every curve, a cost that grows with the
    run and is a tenth of a small model's step; the curves written in groups are the same. Steps
    are the optimizer steps themselves, so a resumed run continues its curves where they were."""

    def __init__(self, live, every: int) -> None:
        self.live, self.every = live, every
        self.rows: list[tuple[int, dict[str, float]]] = []

    def forget_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old rows first."""
        if self.live is None:
            return
        for tsv in (Path(self.live.plots_dir) / "metrics").rglob("*.tsv"):
            lines = tsv.read_text().splitlines(keepends=True)
            kept = lines[:1] + [line for line in lines[1:] if int(line.split("\t", 1)[0]) <= step]
            if len(kept) < len(lines):
                atomic_write_text(tsv, "".join(kept))

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if self.live is None:
            return
        self.rows.append((step, metrics))
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.live is None or not self.rows:
            return
        for step, metrics in self.rows:
            self.live.step = step
            for name, value in metrics.items():
                self.live.log_metric(name, value)
        self.rows.clear()
        self.live.make_summary()


class Trainer:
    def __init__(self, params: TrainParams, models: ModelsParams, items: list[ImageCaption], progress: bool) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        self.params, self.models, self.progress = params, models, progress
        self.fingerprint = data_fingerprint(items)
        self.train_items, self.val_items = split_validation(items, params.validation.fraction)
        # A process may train more than once (notebooks, tests, in-process flows) with another
        # precision; accelerate would keep the first one process-wide. The distributed setup
        # (PartialState) is kept.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=params.mixed_precision, gradient_accumulation_steps=params.gradient_accumulation_steps
        )
        set_seed(params.seed)
        if params.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device = self.accelerator.device
        self._refuse_unsupported()
        self.weight_dtype = dtype_for(params.mixed_precision)
        self.parts = load_sdxl_parts(
            models, unet_dtype=torch.bfloat16 if params.full_bf16 else None, text_encoder_dtype=self.weight_dtype
        )
        self.latent_scale = self.parts.vae.config.scaling_factor  # kept: the VAE may leave memory
        # One length for every caption, so batches and cached embeddings stack: kohya pads all to the longest,
        # the 77 n modes repeat each to the least common multiple of the chunk counts (at most 6 chunks).
        # Captions of up to 75 tokens everywhere: one chunk, CLIP's own encoding.
        tokenizers = [self.parts.tokenizer, self.parts.tokenizer_2]
        mode = models.long_prompt_mode
        need = chunks_needed(tokenizers, [i.caption for i in items], models.max_token_length, mode)
        if params.shuffle_caption and mode != "kohya":  # a shuffled caption may cut into another count
            need += range(1, models.max_token_length // 75 + 1)
        self.n_chunks = common_chunk_count(need, mode)
        self.frozen = FrozenParts(
            self.parts, self.device, self.weight_dtype, lambda: load_sdxl_frozen(models, self.weight_dtype)
        )
        if params.prediction_type:
            self.parts.noise_scheduler.register_to_config(prediction_type=params.prediction_type)
        # Each process draws its own noise and timesteps.
        self.state = checkpoints.TrainState(params.seed + self.accelerator.process_index)
        self.identity = checkpoints.run_identity(params, models, self.fingerprint)
        self.run_dir = run_dir_of(params, self.identity)
        self.buckets = make_buckets(params.resolution, params.bucketing)

    # -- setup ------------------------------------------------------------------------------------

    def _refuse_unsupported(self) -> None:
        """Combinations that would train wrongly or not at all, refused before anything is loaded."""
        from accelerate.utils import DistributedType

        p, kind = self.params, self.accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            raise ConfigError(
                "train: DeepSpeed is not supported by Easel's trainer (its sampler shards the data itself, and no "
                "DeepSpeed run has been tested); use DDP (infra/accelerate/ddp_8gpu.yaml)"
            )
        if p.fused_backward_pass and self.accelerator.num_processes > 1:
            raise ConfigError(
                "params.yaml: train.fused_backward_pass works in one process only: each parameter is stepped "
                f"inside backward, before DDP has averaged its gradient over the {self.accelerator.num_processes} "
                "processes. Turn it off for multi-GPU runs (full_bf16 alone works there)"
            )
        if kind == DistributedType.FSDP:
            chosen = (
                ("ema.enabled", p.ema.enabled),
                ("full_bf16", p.full_bf16),
                ("fused_backward_pass", p.fused_backward_pass),
                # A checkpoint holds whole tensors; FSDP's sharded optimizer state would need its own format.
                ("checkpoint_every", bool(p.checkpoint_every)),
                ("resume_from_checkpoint", p.resume_from_checkpoint is not None),
            )
            options = [name for name, on in chosen if on]
            if options:
                raise ConfigError(
                    f"params.yaml: train.{', train.'.join(options)}: not supported under FSDP (sharded parameters); "
                    "no FSDP run could be tested (accelerate runs FSDP on GPUs only)"
                )

    def _bucket_of(self, items: list[ImageCaption]) -> list[tuple[int, int]]:
        p = self.params
        return [assign_bucket(i.width, i.height, self.buckets, p.bucketing, p.resolution) for i in items]

    def _frozen_parts(self) -> None:
        parts = self.parts
        for frozen in (parts.vae, parts.text_encoder, parts.text_encoder_2):
            frozen.requires_grad_(False)
            frozen.eval()
        self.frozen.place(FrozenParts.NAMES)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.parts
        return encode_prompts(
            [parts.text_encoder, parts.text_encoder_2],
            [parts.tokenizer, parts.tokenizer_2],
            captions,
            self.params.empty_prompt,
            self.models.max_token_length,
            self.n_chunks,
            self.models.long_prompt_mode,
        )

    def _caches(self, train_bucket_of, val_bucket_of):
        p = self.params
        latents = texts = None
        if p.cache_latents:
            identity = folder_identity(self.models.vae or self.parts.base) + ("" if self.models.vae else ":vae")
            latents = LatentCache(Path(p.cache_dir), identity, p.cache_memory_mb)
            flips = (False, True) if p.random_flip else (False,)
            latents.prepare(self.parts.vae, self.train_items, train_bucket_of, flips, self.device, self.progress)
            latents.prepare(self.parts.vae, self.val_items, val_bucket_of, (False,), self.device, self.progress)
        if p.cache_text_embeddings:
            m = self.models  # the layout differs by mode even at the same chunk count
            identity = (
                folder_identity(self.parts.base)
                + f":{p.empty_prompt}:{m.long_prompt_mode}:{m.max_token_length}x{self.n_chunks}"
            )
            texts = TextEmbeddingCache(Path(p.cache_dir), identity, p.cache_memory_mb)
            with torch.no_grad():
                texts.prepare([i.caption for i in self.train_items + self.val_items], self.encode_text, self.progress)
        self._send_cached_parts_away()
        return latents, texts

    def _send_cached_parts_away(self) -> None:
        """The parts the filled caches replace leave the device until samples or the save need them."""
        p = self.params
        away = ["vae"] * p.cache_latents + ["text_encoder", "text_encoder_2"] * p.cache_text_embeddings
        self.frozen.send_away(away)

    # -- one step's inputs ------------------------------------------------------------------------

    def latents_of(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            if "latents" in batch:  # cached (mean, std): sample as the VAE would
                mean, std = batch["latents"][:, 0], batch["latents"][:, 1]
                sample = mean + std * torch.randn(mean.shape, generator=generator)
            else:
                vae = self.parts.vae
                pixels = batch["pixel_values"].to(self.device, dtype=vae.dtype)
                dist = vae.encode(pixels).latent_dist
                sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(self.device)
        return sample.to(self.device, torch.float32) * self.latent_scale  # noised in float32 (diffusion_loss)

    def text_of(self, batch: dict, texts: TextEmbeddingCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        if texts is not None:
            prompt_embeds, pooled = texts.get(batch["captions"])
            return prompt_embeds.to(self.device, self.weight_dtype), pooled.to(self.device, self.weight_dtype)
        with torch.no_grad():
            return self.encode_text(batch["captions"])

    def loss(self, unet, batch: dict, texts, generator: torch.Generator) -> torch.Tensor:
        p = self.params
        latents = self.latents_of(batch, generator)
        prompt_embeds, pooled = self.text_of(batch, texts)
        add_time_ids = time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], self.device)
        return diffusion_loss(
            unet,
            self.parts.noise_scheduler,
            latents,
            prompt_embeds,
            pooled,
            add_time_ids,
            noise_offset=p.noise_offset,
            min_snr_gamma=p.min_snr_gamma,
            timestep_range=(p.min_timestep, min(p.max_timestep, self.parts.noise_scheduler.config.num_train_timesteps)),
            generator=generator,
            input_dtype=self.weight_dtype,
        )

    # -- periodic work ----------------------------------------------------------------------------

    def validation_loss(self, unet, val_loader, texts, ema=None, averaged: bool = False) -> float:
        """Mean loss on the held-out images, with the same noise and timesteps every time, of the
        weights that would be saved: the EMA's when it is on and saved (so the best step, and the
        gate's saved_val_loss, judge what is saved: `averaged`), else the U-Net's own. The EMA is
        the main process's alone: that process computes the loss and every other one receives it."""
        acc = self.accelerator
        if averaged:
            loss = [None]
            if acc.is_main_process:
                model = acc.unwrap_model(unet)  # the bare module: no collective call from one process
                with ema.applied_to(model.parameters()):
                    loss = [self.validation_loss(model, val_loader, texts)]
            if acc.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(loss)
            return loss[0]
        generator = torch.Generator().manual_seed(self.params.seed + 1)
        unet.eval()
        losses = []
        with torch.no_grad():
            for batch in val_loader:
                losses.append(self.loss(unet, batch, texts, generator).item())
        unet.train()
        return float(sum(losses) / len(losses))

    def pipeline(self, unet):
        """The base pipeline's frozen parts with this U-Net, and the Euler sampler SDXL ships with, set
        to predict what the U-Net was trained to predict (samples, the saved model, its export)."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        parts = self.parts
        options: dict[str, str] = {}
        if parts.config_source == parts.base and self.models.revision:
            options["revision"] = self.models.revision  # offline, a cache may hold only the pinned commit
        if self.params.prediction_type:
            options["prediction_type"] = self.params.prediction_type
        scheduler = EulerDiscreteScheduler.from_pretrained(parts.config_source, subfolder="scheduler", **options)
        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )

    def sample_images(self, unet, step: int, out_dir: Path, live) -> None:

        from components.prompts import resolve_negative
        from components.sdxl.generation import GenerationSettings, generate
        from components.sdxl.guidance import Guidance

        p = self.params
        negative = resolve_negative(p.sample_negative_prompt, None)
        settings = GenerationSettings(
            num_inference_steps=p.sample_steps,
            height=p.resolution,
            width=p.resolution,
            guidance=Guidance("cfg", 5.0),
            max_token_length=self.models.max_token_length,
            long_prompt_mode=self.models.long_prompt_mode,
        )
        unet.eval()
        # With cached latents or embeddings the VAE and encoders are off the device; sampling needs
        # them beside the U-Net, for as long as it lasts.
        with self.frozen.on_device():
            pipe = self.pipeline(self.accelerator.unwrap_model(unet))
            pipe.set_progress_bar_config(disable=True)
            images = generate(
                pipe,
                p.sample_prompts,
                [negative] * len(p.sample_prompts),
                [p.sample_seed + i for i in range(len(p.sample_prompts))],
                settings,
            )
        unet.train()
        if not self.accelerator.is_main_process:
            return  # every process generates (FSDP needs them all in the forward); one writes
        folder = out_dir / "samples" / f"step-{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i:02d}.png")
            if live is not None:
                live.log_image(f"samples/{i:02d}.png", image)

    # -- the run ----------------------------------------------------------------------------------

    def run(self, metrics_path: Path | None, plots_dir: Path | None) -> TrainSummary:
        from tqdm import tqdm

        p, parts, acc = self.params, self.parts, self.accelerator
        if p.max_train_steps > MAX_STEPS_WARNING:
            log.warning(
                "train.max_train_steps = %d: the EMU paper (quoted in the guide) saw quality-tuning over-fit "
                "beyond about %d steps",
                p.max_train_steps,
                MAX_STEPS_WARNING,
            )
        self._frozen_parts()
        train_bucket_of, val_bucket_of = self._bucket_of(self.train_items), self._bucket_of(self.val_items)
        with self.accelerator.main_process_first():  # the others then find the caches filled
            latents_cache, texts = self._caches(train_bucket_of, val_bucket_of)
        unet = parts.unet
        if p.attention == "xformers":
            try:
                unet.enable_xformers_memory_efficient_attention()
            except Exception as exc:
                raise EaselError(f"train.attention: xformers is not usable here ({exc}); use sdpa") from None
        if p.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = build_optimizer(unet.parameters(), p)
        lr_scheduler = build_lr_scheduler(optimizer, p, acc.num_processes)
        dataset = CaptionedImages(
            self.train_items,
            self.buckets,
            train_bucket_of,
            center_crop=p.center_crop,
            random_flip=p.random_flip,
            shuffle_caption=p.shuffle_caption,
            keep_tokens=p.keep_tokens,
            caption_dropout=p.caption_dropout,
            seed=p.seed,
            latents=latents_cache,
        )
        # Not passed to accelerate.prepare: the sampler shards the batches itself (see data.py), and
        # batches are moved to the device where they are used.
        sampler = BucketBatchSampler(
            train_bucket_of, p.train_batch_size, p.seed, num_replicas=acc.num_processes, rank=acc.process_index
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=p.dataloader_num_workers,
            persistent_workers=p.dataloader_num_workers > 0,
        )
        val_loader = None
        if self.val_items:
            val_set = CaptionedImages(self.val_items, self.buckets, val_bucket_of, seed=p.seed, latents=latents_cache)
            val_loader = torch.utils.data.DataLoader(
                val_set, batch_sampler=BucketBatchSampler(val_bucket_of, p.train_batch_size, p.seed), collate_fn=collate
            )
        raw_optimizer = optimizer
        unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
        # After prepare, which moved (and maybe wrapped) the U-Net: the EMA and the hooks must see the
        # parameters where they now are.
        ema = self._build_ema(unet)
        resumable = checkpoints.Resumable(unet, optimizer, lr_scheduler, self.state, ema)
        resume = checkpoints.resolve_resume(p.resume_from_checkpoint, self.run_dir, self.identity)
        if resume is not None:
            checkpoints.load_checkpoint(acc, resume, resumable)
            log.info("resumed from %s at step %d", resume, self.state.step)
        elif p.resume_from_checkpoint == "latest":
            log.info("no checkpoint of this run in %s yet: starting from step 0", self.run_dir)
        # After the resume: loading the optimizer's state replaces its param groups, and the hooks must
        # read the groups the LR scheduler writes to.
        fused = FusedBackward(raw_optimizer, unet.parameters()) if p.fused_backward_pass else None
        if val_loader is not None and self.state.step == 0:
            # The base model's loss on the same held-out images, noise and timesteps: what the gate
            # compares the trained weights' loss with (gate.max_val_loss_ratio).
            self.state.base_val_loss = self.validation_loss(unet, val_loader, texts)

        live = None
        if plots_dir is not None and acc.is_main_process:
            from dvclive import Live

            live = Live(dir=str(plots_dir), save_dvc_exp=False, dvcyaml=False, report=None, resume=resume is not None)
        curves = CurveLog(live, p.log_every_n_steps)
        curves.forget_after(self.state.step)
        out_dir = Path(p.out_dir)
        batches_per_epoch = len(sampler)
        micro = self.state.step * p.gradient_accumulation_steps
        losses: list[float] = []
        started = time.perf_counter()
        bar = tqdm(
            total=p.max_train_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not (self.progress and acc.is_local_main_process),
        )
        reset_peak_memory(self.device)  # the curve's peak is training's, not loading's or caching's
        step_start = time.perf_counter()
        while self.state.step < p.max_train_steps:
            sampler.set_position(*divmod(micro, batches_per_epoch))  # (epoch, batches already done)
            for batch in loader:
                micro += 1
                with acc.accumulate(unet):
                    loss = self.loss(unet, batch, texts, self.state.generator)
                    # The mean over processes: what is logged, and a NaN anywhere stops every process.
                    loss_value = acc.gather(loss.detach().reshape(1)).mean().item()
                    if not math.isfinite(loss_value):
                        curves.flush()
                        last = checkpoints.step_dirs(self.run_dir)
                        raise EaselError(
                            f"train: the loss became {loss_value} at step {self.state.step + 1}; lower "
                            "train.learning_rate or use bf16 instead of fp16. No model was saved; the last good "
                            f"checkpoint is {last[-1] if last else 'none (checkpoint_every is 0 or none was due yet)'}."
                        )
                    acc.backward(loss)
                    if fused is not None:  # every parameter has been stepped inside backward
                        grad_norm = fused.finish_step()
                    else:
                        grad_norm = self._clip(unet) if acc.sync_gradients else None
                        optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                self.state.step += 1
                step = self.state.step
                if ema is not None and step % p.ema.update_every == 0:
                    ema.step(acc.unwrap_model(unet).parameters())
                losses.append(loss_value)
                now = time.perf_counter()
                step_time, step_start = now - step_start, now
                metrics = {
                    "train/loss": loss_value,
                    "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/step_seconds": step_time,
                    "train/images_per_second": p.train_batch_size
                    * p.gradient_accumulation_steps
                    / max(step_time, 1e-9),
                    "train/peak_memory_mb": peak_memory_mb(self.device),
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if val_loader is not None and (
                    (p.validation.every_n_steps and step % p.validation.every_n_steps == 0) or step == p.max_train_steps
                ):
                    averaged = p.ema.enabled and p.ema.use_for_save
                    val = self.validation_loss(unet, val_loader, texts, ema, averaged)
                    metrics["val/loss"] = val
                    self.state.last_val_loss = val
                    if val < self.state.best_val_loss:
                        self.state.best_val_loss, self.state.best_step = val, step
                        if p.validation.keep_best:
                            # In the precision the model is saved in: the save casts to it anyway, and
                            # an fp32 EMA of SDXL's U-Net would make each file 10.3 GB instead of 5.1.
                            weights = self._weights(unet, ema, SAVE_DTYPES[p.save_precision])
                            if acc.is_main_process:
                                checkpoints.save_best(self.run_dir, weights, step, val)
                curves.add(step, metrics)
                if p.checkpoint_every and step % p.checkpoint_every == 0:
                    curves.flush()  # the curves on disk reach the checkpoint a resume starts from
                    checkpoints.save_checkpoint(acc, self.run_dir, step, p.keep_checkpoints, resumable, self.identity)
                if p.sample_every_n_steps and p.sample_prompts and step % p.sample_every_n_steps == 0:
                    self.sample_images(unet, step, out_dir, live)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if step >= p.max_train_steps:
                    break
        bar.close()
        curves.flush()
        if fused is not None:
            fused.remove()
        # Training is over and the last checkpoint (if any) is written: the optimizer's state is not
        # needed for the save (at SDXL's size, 1 GB for Adafactor, 20 GB for AdamW).
        raw_optimizer.state.clear()
        seconds = time.perf_counter() - started
        acc.wait_for_everyone()
        return self._finish(unet, ema, losses, seconds, metrics_path, live)

    def _build_ema(self, unet) -> EMA | None:
        """The EMA of the prepared U-Net's parameters, on the accelerator or in CPU memory, kept by
        the main process only: every process holds the same weights after each step, and only the
        main process validates with, checkpoints and saves the average (a whole copy of the U-Net
        per process otherwise: 10 GB in float32 at SDXL's size)."""
        ema = self.params.ema
        if not ema.enabled:
            return None
        horizon = ema_horizon_steps(ema.decay, ema.update_every, ema.warmup, self.params.max_train_steps)
        log.info(
            "EMA: decay %g every %d steps%s; at step %d it looks back %.0f steps (the set decay: %.0f), and the "
            "first update's weights are %.1f%% of it",
            ema.decay,
            ema.update_every,
            " with diffusers' warm-up" if ema.warmup else "",
            self.params.max_train_steps,
            horizon["horizon_steps"],
            horizon["set_horizon_steps"],
            100 * horizon["first_update_share"],
        )
        if not self.accelerator.is_main_process:
            return None
        device = self.device if ema.device == "accelerator" else torch.device("cpu")
        dtype = torch.bfloat16 if ema.dtype == "bf16" else torch.float32
        parameters = self.accelerator.unwrap_model(unet).parameters()
        return EMA(parameters, ema.decay, device, dtype, seed=self.params.seed, warmup=ema.warmup)

    def _clip(self, unet) -> torch.Tensor:
        """Clip by the global norm (or only measure it, with max_grad_norm null); returns the norm."""
        if self.params.max_grad_norm is not None:
            return self.accelerator.clip_grad_norm_(unet.parameters(), self.params.max_grad_norm)
        self.accelerator.unscale_gradients()
        return torch.nn.utils.get_total_norm([q.grad for q in unet.parameters() if q.grad is not None])

    def _weights(self, unet, ema, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The weights to keep, on the CPU (in `dtype`, if given): the EMA's if it is on and chosen
        for saving, else the U-Net's. Every process calls this (a multi-process state dict may need
        them all). Tensors already on the CPU in that dtype are not copied: callers write them out
        before training changes them."""
        state = self.accelerator.get_state_dict(unet)
        if ema is not None and self.params.ema.use_for_save:
            names = [name for name, _ in self.accelerator.unwrap_model(unet).named_parameters()]
            state = dict(state) | dict(zip(names, ema.weights(), strict=True))
        return {k: v.detach().to("cpu", dtype if v.is_floating_point() else None) for k, v in state.items()}

    def _finish(self, unet, ema, losses, seconds, metrics_path, live) -> TrainSummary:
        p = self.params
        model_dir = Path(p.out_dir) / "model"
        steps_this_run = len(losses)
        summary = {
            "steps": self.state.step,
            "final_loss": losses[-1] if losses else float("nan"),
            "mean_loss_last_10": float(sum(losses[-10:]) / len(losses[-10:])) if losses else float("nan"),
            "best_val_loss": None if math.isinf(self.state.best_val_loss) else self.state.best_val_loss,
            "best_step": self.state.best_step,
            # Held-out losses: the base model's, the last validation's, and that of the weights saved.
            "base_val_loss": self.state.base_val_loss,
            "final_val_loss": self.state.last_val_loss,
            "seconds": round(seconds, 2),
            "images_per_second": round(
                steps_this_run * p.train_batch_size * p.gradient_accumulation_steps / max(seconds, 1e-9), 3
            ),
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
        }
        if p.ema.enabled:  # how far back the saved average looks (README: "The EMA's horizon")
            horizon = ema_horizon_steps(p.ema.decay, p.ema.update_every, p.ema.warmup, self.state.step)
            summary["ema_horizon_steps"] = round(horizon["horizon_steps"], 1)
        keep_best = p.validation.keep_best and self.state.best_step is not None
        summary["saved_val_loss"] = summary["best_val_loss"] if keep_best else summary["final_val_loss"]
        weights = None if keep_best else self._weights(unet, ema)
        if self.accelerator.is_main_process:
            from accelerate import init_empty_weights
            from diffusers import UNet2DConditionModel

            if keep_best:
                weights = checkpoints.load_best(self.run_dir, self.state.best_step)
            # A fresh U-Net for the save (the training one may be wrapped or sharded), built without
            # initialising weights that are replaced at once.
            with init_empty_weights():
                model = UNet2DConditionModel.from_config(self.accelerator.unwrap_model(unet).config)
            model.load_state_dict(weights, strict=True, assign=True)
            del weights
            # On a CPU the saved tensors are the training ones: with the training U-Net's hold on them
            # dropped, the cast to save_precision frees each as it copies it, instead of keeping two
            # copies of the weights at once.
            for param in self.accelerator.unwrap_model(unet).parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            model.to(SAVE_DTYPES[p.save_precision])
            # The frozen parts as the base files hold them: training cast the encoders to its precision
            # (or released them), and the model folder and its export must carry the base's, unrounded.
            parts = self.parts
            parts.vae, parts.text_encoder, parts.text_encoder_2 = load_sdxl_frozen(self.models, torch.float32)
            pipe = self.pipeline(model)
            with atomic_dir(model_dir) as tmp:
                pipe.save_pretrained(str(tmp), safe_serialization=True)
                atomic_write_text(
                    tmp / "README.md", model_card(p, self.models, self.fingerprint, len(self.train_items), summary)
                )
                # Only what determines the weights goes in the model folder (no timings), so the same
                # training gives the same registry version.
                atomic_write_json(
                    tmp / "easel_train.json",
                    {
                        "base_model": self.models.sdxl,
                        "vae": self.models.vae,
                        "data_fingerprint": self.fingerprint,
                        "images": len(self.train_items),
                        "validation_images": len(self.val_items),
                        "steps": summary["steps"],
                        "final_loss": summary["final_loss"],
                        "best_val_loss": summary["best_val_loss"],
                        "best_step": summary["best_step"],
                        "base_val_loss": summary["base_val_loss"],
                        "final_val_loss": summary["final_val_loss"],
                        "saved_val_loss": summary["saved_val_loss"],
                        "weights": "ema" if (p.ema.enabled and p.ema.use_for_save) else "raw",
                    },
                )
            if metrics_path is not None:
                atomic_write_json(metrics_path, summary)
            if live is not None:
                live.end()
        return TrainSummary(
            summary["steps"],
            summary["final_loss"],
            summary["mean_loss_last_10"],
            summary["best_val_loss"],
            seconds,
            summary["images_per_second"],
            model_dir,
        )


def model_card(params: TrainParams, models: ModelsParams, fingerprint: str, n_images: int, summary: dict) -> str:
    best = (
        f", best validation loss {summary['best_val_loss']:.5f} at step {summary['best_step']}"
        if summary.get("best_val_loss") is not None
        else ""
    )
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
            f"- steps: {summary['steps']}, final loss {summary['final_loss']:.5f}{best}",
            f"- saved in {params.save_precision}"
            + (", EMA weights" if params.ema.enabled and params.ema.use_for_save else ""),
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
    items = load_training_items(caption_dir)
    # Before anything is loaded: a run that cannot write its checkpoints and model fails now, not hours in.
    check_disk(plan_run(params, models, items))
    return Trainer(params, models, items, progress).run(metrics_path, plots_dir)


def run_dir_of(params: TrainParams, identity: dict) -> Path:
    """The run's checkpoint folder: named by what determines its weights, so only its own run resumes there."""
    return Path(params.checkpoint_dir) / checkpoints.run_id(identity)


def plan_run(params: TrainParams, models: ModelsParams, items: list[ImageCaption]) -> TrainPlan:
    """`plan_training` for these items, counting what this run (resumed or repeated) already wrote."""
    identity = checkpoints.run_identity(params, models, data_fingerprint(items))
    return plan_training(params, models, len(items), run_dir_of(params, identity))
