"""Training speed: Easel's trainer against the diffusers SDXL example's loop, same settings.

The diffusers example (examples/text_to_image/train_text_to_image_sdxl.py) precomputes the VAE
latents and the prompt embeddings, then runs a plain accelerate loop: noise, timesteps,
add_noise, the U-Net with SDXL's added conditions, MSE, backward, clipping, AdamW. It is
re-created here in a few lines. Easel runs its own trainer with cached latents and text
embeddings (the equivalent setting). Same tiny SDXL, same images, batch size, resolution,
optimizer and learning rate. Both run interleaved over rounds; the best and the median round of each are compared.

    .venv/bin/python -m benchmarks.train_bench [--steps 40] [--resolution 128] [--batch 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from components.config import TrainParams
from components.models.loaders import TINY_ROOT, load_sdxl_parts
from components.models.tiny import build_tiny_models
from components.train import run_train
from components.train.sdxl import encode_prompts
from tests.helpers import encode, make_caption_dir, noise
from tests.test_models import tiny_params


def dataset(folder: Path, count: int, size: int) -> Path:
    files = {f"img{i}.png": encode(noise(size, size, seed=300 + i), "PNG") for i in range(count)}
    return make_caption_dir(folder, files, [f"a poster, style {i}" for i in range(count)])


def diffusers_example_loop(captions: Path, steps: int, resolution: int, batch: int, lr: float) -> float:
    """The example's training loop on precomputed latents and embeddings; returns steps/s."""
    from accelerate import Accelerator
    from PIL import Image

    from components.train.data import to_tensor

    accelerator = Accelerator(mixed_precision="no")
    parts = load_sdxl_parts(tiny_params(TINY_ROOT))
    for frozen in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        frozen.requires_grad_(False)
    table = pd.read_parquet(captions / "captions.parquet")
    with torch.no_grad():  # the example's dataset.map(compute_vae_encodings_fn / compute_embeddings_fn)
        pixels = torch.stack(
            [to_tensor(Image.open(p).convert("RGB").resize((resolution, resolution))) for p in table["image_path"]]
        )
        latents_all = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
        prompt_all, pooled_all = encode_prompts(
            [parts.text_encoder, parts.text_encoder_2], [parts.tokenizer, parts.tokenizer_2], table["caption"].tolist()
        )
    data = torch.utils.data.TensorDataset(latents_all, prompt_all, pooled_all)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    unet = parts.unet
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
    scheduler = parts.noise_scheduler
    done, start = 0, None
    while done < steps + 3:
        for latents, prompt_embeds, pooled in loader:
            if done == 3:
                start = time.perf_counter()  # after warm-up
            with accelerator.accumulate(unet):
                noise_ = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
                noisy = scheduler.add_noise(latents, noise_, timesteps)
                pred = unet(
                    noisy,
                    timesteps,
                    prompt_embeds,
                    added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled},
                    return_dict=False,
                )[0]
                loss = F.mse_loss(pred.float(), noise_.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            done += 1
            if done >= steps + 3:
                break
    return steps / (time.perf_counter() - start)


def easel_trainer(captions: Path, work: Path, steps: int, resolution: int, batch: int, lr: float) -> float:
    params = TrainParams(
        out_dir=str(work / "train"),
        resolution=resolution,
        max_train_steps=steps + 3,
        train_batch_size=batch,
        learning_rate=lr,
        cache_latents=True,
        cache_text_embeddings=True,
        cache_dir=str(work / "cache"),
        checkpoint_dir=str(work / "ckpt"),
        bucketing={"enabled": False},
    )
    params_warm = params.model_copy(update={"max_train_steps": 3})
    run_train(params_warm, tiny_params(TINY_ROOT), captions, progress=False)  # fills the caches
    metrics = work / "metrics.json"
    plots = work / "plots"
    run_train(params, tiny_params(TINY_ROOT), captions, metrics, plots, progress=False)
    step_seconds = pd.read_csv(plots / "plots" / "metrics" / "train" / "step_seconds.tsv", sep="\t")["step_seconds"]
    return steps / float(step_seconds.iloc[3:].sum())  # the same steps the example loop times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    build_tiny_models(TINY_ROOT)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu; tiny SDXL, "
        f"{args.resolution} px, batch {args.batch}, {args.steps} timed steps"
    )
    runs: dict[str, list[float]] = {"example": [], "easel": []}
    with tempfile.TemporaryDirectory() as tmp:
        captions = dataset(Path(tmp), args.images, args.resolution)
        for round_index in range(args.rounds):
            example = diffusers_example_loop(captions, args.steps, args.resolution, args.batch, 1e-4)
            easel = easel_trainer(
                captions, Path(tmp) / f"easel{round_index}", args.steps, args.resolution, args.batch, 1e-4
            )
            runs["example"].append(example)
            runs["easel"].append(easel)
            print(f"round {round_index + 1}: diffusers example loop {example:.2f} steps/s, Easel {easel:.2f} steps/s")
    ratios = [e / x for e, x in zip(runs["easel"], runs["example"], strict=True)]
    print(f"median of the rounds' ratios: {statistics.median(ratios):.3f}")
    for name, pick in (("best", max), ("median", statistics.median)):
        example, easel = pick(runs["example"]), pick(runs["easel"])
        print(
            f"{name}: example {example:.2f} steps/s, Easel {easel:.2f} steps/s, Easel / example = {easel / example:.3f}"
        )


if __name__ == "__main__":
    main()
