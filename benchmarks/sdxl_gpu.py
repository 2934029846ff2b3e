"""The full SDXL U-Net's training step on a GPU at 1024 px: peak device memory and time per step of
each recipe of the CPU rehearsal (benchmarks/sdxl_rehearsal.py), held against `easel train --plan`.

What is real: the SDXL base 1.0 U-Net architecture (2,567,463,684 parameters, random weights, made
on the device), the `sdxl` profile's train settings from params.yaml with each row's overrides, and
Easel's own training pieces: `build_optimizer` (Adafactor / AdamW with stochastic rounding),
`FusedBackward`, the EMA, `diffusion_loss` (float32 noising, the DDPM schedule) and `time_ids`.
What is not: the loader, the data and the caches. Each step gets a fresh cached-latent-sized input
(4 x 128 x 128 at 1024 px) and text embeddings of the profile's length (225 tokens: 227 states),
as the caches hand them to the U-Net; the VAE and encoders are not on the device (with cached
latents and embeddings the trainer sends them away). So the figures are the U-Net's training step,
which is what the plan's arithmetic covers.

Every row runs in its own process (a fresh CUDA context and allocator), one after the other; the
parent writes the results after each row, so a run cut short still reports what it measured.

    python -m benchmarks.sdxl_gpu --out results.json [--resolution 1024] [--steps 6]
    python -m benchmarks.sdxl_gpu --small --device cpu --resolution 64   # a smoke run of the script
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
# Rows beyond the rehearsal's: what a GPU owner asks next.
EXTRA = {
    "sdxl profile as shipped (EMA bf16 in CPU memory, every 10 steps)": {},
    "sdxl profile without gradient checkpointing": {"gradient_checkpointing": False, "ema": {"enabled": False}},
    "sdxl profile, batch 4": {"train_batch_size": 4, "ema": {"enabled": False}},
}
SMALL_UNET = {  # --small: the same block structure, tiny widths: checks the script, not the numbers
    "block_out_channels": [32, 64, 128],
    "attention_head_dim": [1, 2, 4],
    "transformer_layers_per_block": [1, 1, 1],
}


def rows() -> dict[str, dict]:
    """name -> train overrides over the `sdxl` profile: the rehearsal's rows (same names) and EXTRA."""
    from benchmarks.sdxl_rehearsal import COMMON, CONFIGS

    table = {name: {**COMMON, **config} for name, (config, _) in CONFIGS.items()}
    first = next(iter(EXTRA))
    return {first: EXTRA[first]} | table | {k: COMMON | v for k, v in EXTRA.items() if k != first}


def train_params(overrides: dict, resolution: int):
    import yaml

    from components.config import Params, TrainParams, deep_merge

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = Params.model_validate(deep_merge(raw, raw["profiles"]["sdxl"]))
    # Each override replaces the profile's value whole (optimizer_args, ema), as in the rehearsal.
    return TrainParams(**(params.train.model_dump() | overrides | {"resolution": resolution})), params.models


def child(name: str, resolution: int, steps: int, device_name: str, small: bool, batch: int | None) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from benchmarks.sdxl_hub_cache import SCHEDULER_CONFIG, UNET_CONFIG
    from components.train.memory import EMA, FusedBackward, peak_memory_mb, reset_peak_memory
    from components.train.optim import build_optimizer
    from components.train.plan import memory_gb
    from components.train.sdxl import diffusion_loss, time_ids

    train, models = train_params(rows()[name] | ({"train_batch_size": batch} if batch else {}), resolution)
    device = torch.device(device_name)
    weight_dtype = torch.bfloat16
    config = UNET_CONFIG | (SMALL_UNET if small else {})
    started = time.perf_counter()
    with torch.device(device):
        unet = UNet2DConditionModel(**config)  # random weights, made where they train
    if train.full_bf16:
        unet.to(weight_dtype)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    shapes = [tuple(p.shape) for p in unet.parameters()]
    optimizer = build_optimizer(unet.parameters(), train)
    fused = FusedBackward(optimizer, unet.parameters()) if train.fused_backward_pass else None
    ema = None
    if train.ema.enabled:
        ema_device = device if train.ema.device == "accelerator" else torch.device("cpu")
        ema_dtype = torch.bfloat16 if train.ema.dtype == "bf16" else torch.float32
        ema = EMA(unet.parameters(), train.ema.decay, ema_device, ema_dtype, train.seed, train.ema.warmup)
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    setup_seconds = time.perf_counter() - started

    batch, side = train.train_batch_size, resolution // 8
    states = 2 + 75 * (models.max_token_length // 75)  # kohya's layout of a 225-token prompt: 227
    generator = torch.Generator().manual_seed(train.seed)
    sizes = [(resolution, resolution)] * batch
    add_time_ids = time_ids(sizes, [(0, 0)] * batch, sizes, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    at_start = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else float("nan")
    reset_peak_memory(device)
    seconds, losses = [], []
    for _ in range(steps):
        begin = time.perf_counter()
        latents = torch.randn(batch, 4, side, side, generator=generator).to(device)
        prompt_embeds = torch.randn(batch, states, 2048, generator=generator).to(device, weight_dtype)
        pooled = torch.randn(batch, 1280, generator=generator).to(device, weight_dtype)
        with torch.autocast(device.type, dtype=weight_dtype):  # what accelerate's bf16 mixed precision does
            loss = diffusion_loss(
                unet, scheduler, latents, prompt_embeds, pooled, add_time_ids, generator=generator,
                input_dtype=weight_dtype,
            )  # fmt: skip
        loss.backward()
        if fused is not None:
            fused.finish_step()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        synchronize()
        seconds.append(time.perf_counter() - begin)
    peak = peak_memory_mb(device) * 2**20 / GB
    ema_seconds = None
    if ema is not None:
        begin = time.perf_counter()
        ema.step(unet.parameters())
        synchronize()
        ema_seconds = time.perf_counter() - begin
    plan = memory_gb(train, shapes)
    result = {
        "config": name,
        "parameters": sum(math.prod(s) for s in shapes),
        "resolution": resolution,
        "batch": batch,
        "text_states": states,
        "plan_gb": plan,
        "allocated_at_start_gb": at_start,
        "training_peak_gb": peak,
        "seconds_per_step": sum(seconds[1:]) / max(len(seconds) - 1, 1),
        "first_step_seconds": seconds[0],
        "setup_seconds": setup_seconds,
        "ema_update_seconds": ema_seconds,
        "losses": losses,
    }
    if device.type == "cuda":
        result["reserved_peak_gb"] = torch.cuda.max_memory_reserved(device) / GB
        result["device"] = torch.cuda.get_device_name(device)
    result["torch"] = torch.__version__
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| configuration | plan (arithmetic) | measured peak (allocated) | plan / measured | s/step | status |",
        "|---|---|---|---|---|---|",
    ]
    for row in results:
        if row.get("status") != "measured":
            lines.append(f"| {row['config']} | - | - | - | - | {row.get('status')} |")
            continue
        plan = row["plan_gb"]["total"]
        lines.append(
            f"| {row['config']} | {plan:.2f} GB | {row['training_peak_gb']:.2f} GB | "
            f"{plan / row['training_peak_gb']:.2f} | {row['seconds_per_step']:.2f} | measured |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="steps per row; the first is warm-up")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, help="every row's batch size (default: the row's)")
    parser.add_argument("--small", action="store_true", help="a small U-Net of the same structure (smoke runs)")
    parser.add_argument("--only", action="append", help="run only these rows (by name)")
    parser.add_argument("--row-timeout", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=Path(".easel/sdxl_gpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.resolution, args.steps, args.device, args.small, args.batch)
        print("RESULT " + json.dumps(result))
        return
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in rows():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, "-m", "benchmarks.sdxl_gpu", "--child", name, "--resolution", str(args.resolution)]
        command += ["--steps", str(args.steps), "--device", args.device] + (["--small"] if args.small else [])
        command += ["--batch", str(args.batch)] if args.batch else []
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.row_timeout)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode == 0 and found:
                row = json.loads(found[-1][len("RESULT ") :]) | {"status": "measured"}
            else:
                oom = "OutOfMemoryError" in done.stderr
                row = {"config": name, "status": "out of device memory" if oom else f"failed (exit {done.returncode})"}
                row["log_tail"] = done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            row = {"config": name, "status": f"stopped after {args.row_timeout:g} s"}
        row["wall_seconds"] = time.perf_counter() - started
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
