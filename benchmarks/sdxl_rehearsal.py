"""Full-size rehearsal of the `sdxl` profile on this CPU: memory and time per step of each recipe.

The real SDXL base 1.0 architecture with random weights (benchmarks/sdxl_hub_cache.py) sits in a
Hugging Face cache under its real repo id; the `sdxl` profile of params.yaml loads it with
HF_HUB_OFFLINE=1 and Easel's trainer (`run_train`) trains a few steps at low resolution. Every
configuration runs in its own child process, one after the other, under a memory cap: the parent
polls the child's resident memory (/proc/PID/status) and stops it above the cap, and RLIMIT_AS is a
backstop. A configuration whose memory arithmetic is above the cap is not started; its row says
what it needs.

Each configuration: gradient checkpointing, cached latents and text embeddings, batch 1, no
gradient clipping (so fused and unfused rows compute the same steps), the profile's Adafactor
settings or AdamW, EMA off (it is a separate choice: ema.device/dtype), no
validation, samples or checkpoints. Overridden from the profile, and said in the output:
resolution (256), steps, models.vae (null: the fp16-fixed VAE's repository is not written;
with cached latents the VAE only encodes once) and models.variant: `fp16` (the real repository's
half-size files) for bf16 weights, none (fp32 files) for fp32 weights, so that loading never holds
the weights in a second dtype.

Reported per configuration: the training peak (the trainer's `peak_memory_mb` curve, which starts
at the first step: RSS high-water mark here, allocated device memory on a GPU), the process peak
(loading and the final save included), and seconds per step (mean of the steps after the first).

    .venv/bin/python -m benchmarks.sdxl_rehearsal [--resolution 256] [--steps 3] [--cap-gb 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

GB = 1e9
PARAMS = Path("params.yaml")
COMMON = {
    "gradient_checkpointing": True,
    "max_grad_norm": None,  # the profile's (the fused pass cannot clip): the same maths in every row
    "cache_latents": True,
    "cache_text_embeddings": True,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "bf16",
    "bucketing": {"enabled": False},
    "ema": {"enabled": False},
    "validation": {"fraction": 0.0},
    "checkpoint_every": 0,
    "sample_every_n_steps": 0,
    "log_every_n_steps": 1,
}
# Each row states the three choices it is about, whatever the profile says.
MIXED = {"full_bf16": False}
FULL = {"full_bf16": True}
FUSED = {"fused_backward_pass": True}
PLAIN = {"fused_backward_pass": False}
ADAFACTOR = {"optimizer": "adafactor"}
ADAMW = {"optimizer": "adamw", "optimizer_args": {"weight_decay": 0.01}}
LARGEST_TWO = {
    "optimizer": "adafactor",
    "optimizer_args": {
        "clip_threshold": 1.0,
        "relative_step": False,
        "scale_parameter": False,
        "warmup_init": False,
        "weight_decay": 0.01,
        "factored_dims": "largest_two",
    },
}
# name: (train overrides, models.variant: the files of the weights' own dtype, so that loading
# never holds a copy in another dtype beside them)
CONFIGS = {
    "mixed bf16 + AdamW": (MIXED | PLAIN | ADAMW, None),
    "mixed bf16 + Adafactor": (MIXED | PLAIN | ADAFACTOR, None),
    "full_bf16 + Adafactor": (FULL | PLAIN | ADAFACTOR, "fp16"),
    "full_bf16 + Adafactor + fused backward": (FULL | FUSED | ADAFACTOR, "fp16"),
    "extra: full_bf16 + Adafactor (factored_dims largest_two) + fused backward": (FULL | FUSED | LARGEST_TWO, "fp16"),
    "extra: mixed bf16 (fp32 weights) + Adafactor + fused backward": (MIXED | FUSED | ADAFACTOR, None),
}


def needs(config: dict, shapes: list[tuple[int, ...]]) -> dict[str, float]:
    """The memory arithmetic of a configuration for the SDXL U-Net, in GB: `easel train --plan`'s
    (components/train/plan.py), whose 2 GB for everything else this rehearsal measured."""
    from components.config import TrainParams
    from components.train.plan import memory_gb

    return memory_gb(TrainParams(**config), shapes)


def unet_shapes() -> list[tuple[int, ...]]:
    from benchmarks.sdxl_hub_cache import meta_models

    return [tuple(p.shape) for p in meta_models()["unet"].parameters()]


# -- the child: one configuration -------------------------------------------------------------------


def resident_gb() -> float:
    return status_kb(os.getpid(), "VmRSS") * 1024 / GB


def watch_resident_memory() -> dict[str, float]:
    """Resident memory when training starts (after loading, caching and releasing the frozen parts)
    and after each step, for the breakdown in RESULTS: the trainer's own hooks, wrapped."""
    from components.train import loop

    seen: dict[str, float] = {}
    reset, add = loop.reset_peak_memory, loop.CurveLog.add

    def reset_and_note(device):
        reset(device)
        seen["training start"] = resident_gb()

    def add_and_note(self, step, metrics):
        seen[f"after step {step}"] = resident_gb()
        add(self, step, metrics)

    loop.reset_peak_memory = reset_and_note
    loop.CurveLog.add = add_and_note
    return seen


def child(name: str, work: Path, captions: Path, resolution: int, steps: int) -> None:
    import yaml

    from components.config import Params, TrainParams, deep_merge
    from components.train import run_train

    raw = yaml.safe_load(PARAMS.read_text())
    params = Params.model_validate(deep_merge(raw, raw["profiles"]["sdxl"]))
    config, variant = CONFIGS[name]
    overrides = COMMON | config
    overrides |= {
        "resolution": resolution,
        "max_train_steps": steps,
        "out_dir": str(work / "train"),
        "cache_dir": str(work / "cache"),
        "checkpoint_dir": str(work / "ckpt"),
    }
    train = TrainParams(**(params.train.model_dump() | overrides))
    models = params.models.model_copy(update={"vae": None, "variant": variant})
    resident = watch_resident_memory()
    started = time.perf_counter()
    run_train(train, models, captions, work / "metrics.json", work / "plots", progress=False)
    curves = work / "plots" / "plots" / "metrics" / "train"
    seconds = pd.read_csv(curves / "step_seconds.tsv", sep="\t")["step_seconds"]
    peak = pd.read_csv(curves / "peak_memory_mb.tsv", sep="\t")["peak_memory_mb"]
    loss = pd.read_csv(curves / "loss.tsv", sep="\t")["loss"]
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds_per_step": float(seconds.iloc[1:].mean()),
                "first_step_seconds": float(seconds.iloc[0]),
                "training_peak_gb": float(peak.max()) * 2**20 / GB,
                "losses": [float(v) for v in loss],
                "wall_seconds": time.perf_counter() - started,
                "resident_gb": resident,
                "model": params.models.sdxl,
            }
        ),
        flush=True,
    )


# -- the parent: every configuration, capped -------------------------------------------------------


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_capped(command: list[str], env: dict, cap_gb: float, log: Path) -> tuple[int, float, bool, str]:
    """Run a child under the cap; (exit code, process peak in GB, stopped for memory, stdout)."""

    def limit() -> None:  # a backstop only: address space includes mapped libraries and files
        hard = int((cap_gb + 24) * GB)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))

    with open(log, "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=limit)
        peak_kb, stopped = 0, False
        while proc.poll() is None:
            rss, hwm = status_kb(proc.pid, "VmRSS"), status_kb(proc.pid, "VmHWM")
            peak_kb = max(peak_kb, rss or 0, hwm or 0)
            if rss and rss * 1024 > cap_gb * GB:
                proc.kill()
                stopped = True
            time.sleep(0.2)
        out = proc.stdout.read()
    return proc.returncode, peak_kb * 1024 / GB, stopped, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub-cache", type=Path, default=Path(".easel/rehearsal/hub"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the first is warm-up)")
    parser.add_argument("--cap-gb", type=float, default=16.0, help="memory cap per child process")
    parser.add_argument("--only", action="append", help="run only these configurations (by name)")
    parser.add_argument("--out", type=Path, default=Path(".easel/rehearsal/results.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--captions", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.captions, args.resolution, args.steps)
        return

    from benchmarks.sdxl_hub_cache import write_sdxl_base
    from tests.helpers import encode, make_caption_dir, noise

    write_sdxl_base(args.hub_cache)
    shapes = unet_shapes()
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {ram:.1f} GB RAM; "
        f"SDXL U-Net {sum(math.prod(s) for s in shapes):,} parameters; "
        f"{args.resolution} px, batch 1, {args.steps} steps; "
        f"cap {args.cap_gb} GB per configuration",
        flush=True,
    )
    env = os.environ | {"HF_HUB_CACHE": str(args.hub_cache.resolve()), "HF_HUB_OFFLINE": "1", "EASEL_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as tmp:
        size = args.resolution
        files = {f"img{i}.png": encode(noise(size, size, seed=500 + i), "PNG", dpi=(96, 96)) for i in range(2)}
        captions = make_caption_dir(Path(tmp), files, ["a minimalist poster, blue", "a travel poster, island"])
        for name, (config, _) in CONFIGS.items():
            if args.only and name not in args.only:
                continue
            need = needs(COMMON | config, shapes)
            row = {"config": name, "needs_gb": need}
            if need["total"] > args.cap_gb:
                row["status"] = f"not run: needs ~{need['total']:.1f} GB, above the {args.cap_gb:g} GB cap"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            work = Path(tmp) / f"config-{len(rows)}"
            work.mkdir()
            command = [sys.executable, "-m", "benchmarks.sdxl_rehearsal", "--child", name, "--work", str(work)]
            command += ["--captions", str(captions), "--resolution", str(size), "--steps", str(args.steps)]
            started = time.perf_counter()
            code, peak, stopped, out = run_capped(command, env, args.cap_gb, work.parent / f"{work.name}.log")
            row |= {"process_peak_gb": peak, "wall_seconds": time.perf_counter() - started}
            result = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if code == 0 and result:
                row |= json.loads(result[-1][len("RESULT ") :]) | {"status": "measured"}
            else:
                tail = (work.parent / f"{work.name}.log").read_text()[-1500:]
                row["status"] = "stopped at the memory cap" if stopped else f"failed (exit {code})"
                row["log_tail"] = tail
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print("\n| configuration | needs (arithmetic) | training peak | process peak | s/step | status |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        need = row["needs_gb"]
        parts = (
            f"{need['total']:.1f} GB ({need['weights']:.1f} w + {need['gradients']:.1f} g"
            f" + {need['optimizer']:.2f} opt)"
        )
        measured = row.get("status") == "measured"
        print(
            f"| {row['config']} | {parts} | "
            + (
                f"{row['training_peak_gb']:.2f} GB | {row['process_peak_gb']:.2f} GB | {row['seconds_per_step']:.1f} |"
                if measured
                else "- | - | - |"
            )
            + f" {row['status']} |"
        )


if __name__ == "__main__":
    main()
