"""`easel train --plan` and the disk check every run makes: the figures against what a run writes,
the sdxl profile on a 64 GB disk, and a run the disk cannot hold refused before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.sdxl_hub_cache import write_sdxl_base
from components.plumbing.errors import ConfigError
from components.train import run_train
from components.train.loop import load_training_items, plan_run
from components.train.plan import GB, checkpoint_bytes, filesystems, model_shapes, plan_training
from tests.test_models import tiny_params
from tests.test_train import captioned_set, train_params

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_plan_is_what_a_run_writes(tmp_path, tiny_models):
    """A tiny run with checkpoints (U-Net, Adafactor, a bf16 EMA), the best weights and the model:
    each file set is the size the plan gives it (headers and JSON aside)."""
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    params = train_params(
        tmp_path,
        max_train_steps=4,
        checkpoint_every=2,
        keep_checkpoints=1,
        optimizer="adafactor",
        ema={"enabled": True, "dtype": "bf16", "device": "cpu"},
        validation={"fraction": 0.3, "every_n_steps": 2, "keep_best": True},
        save_precision="fp16",
    )
    plan = plan_training(params, models, images=6)
    run_train(params, models, captions, progress=False)
    (run_dir,) = Path(params.checkpoint_dir).iterdir()
    (checkpoint,) = run_dir.glob("step-*")  # keep_checkpoints 1
    per = checkpoint_bytes(params, model_shapes(models)[1]["unet"])
    assert folder_bytes(checkpoint) == pytest.approx(sum(per.values()), rel=0.05)
    assert set(per) == {"U-Net", "optimizer", "EMA"}
    need = {n.what: n for n in plan.disk}
    best_files = list((run_dir / "best").glob("*.safetensors"))
    assert best_files and all(
        f.stat().st_size == pytest.approx(plan.unet_parameters * 2, rel=0.05) for f in best_files
    )  # in fp16, the save precision
    assert folder_bytes(Path(params.out_dir) / "model") == pytest.approx(need["model"].bytes, rel=0.05)
    assert need["checkpoints"].bytes == 2 * sum(per.values())  # the kept one and the one being written
    # Run again (a resume, or the same run repeated): what it wrote is on the disk already, and only
    # the rest needs room, so a disk that held the first run is not refused for the second.
    again = {n.what: n for n in plan_run(params, models, load_training_items(captions)).disk}
    assert again["checkpoints"].present == folder_bytes(checkpoint)
    assert again["checkpoints"].more == need["checkpoints"].bytes - folder_bytes(checkpoint)
    assert again["best weights"].present == folder_bytes(run_dir / "best")
    assert again["model"].present == 0  # a new model folder is written beside the old one


def test_a_run_the_disk_cannot_hold_is_refused_before_anything_loads(tmp_path, tiny_models):
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    probe = train_params(tmp_path, checkpoint_every=1)
    per = sum(checkpoint_bytes(probe, model_shapes(models)[1]["unet"]).values())
    free = filesystems(plan_training(probe, models).disk)
    (_, available, _), *_ = free.values()
    keep = int(2 * available / per)  # twice what the disk holds
    params = train_params(tmp_path, checkpoint_every=1, max_train_steps=keep + 10, keep_checkpoints=keep)
    with pytest.raises(ConfigError, match=r"train.keep_checkpoints.*easel train --plan") as caught:
        run_train(params, models, captions, progress=False)
    assert "free" in str(caught.value) and str(Path(params.checkpoint_dir)) in str(caught.value)
    assert not Path(params.checkpoint_dir).exists() and not Path(params.out_dir).exists()  # nothing written


PLAN_1000_IMAGES = """
import json, sys
from components.config import load_params
from components.train.plan import plan_training
params = load_params(sys.argv[1])
plan = plan_training(params.train, params.models, images=1000, device="cuda")
disk = {n.what: n.bytes for n in plan.disk}
print(json.dumps({"unet": plan.unet_parameters, "memory": plan.memory_gb, "disk": disk}))
"""


def test_the_sdxl_profile_fits_a_64_gb_disk_with_its_hub_cache(tmp_path):
    """The real SDXL base 1.0 architecture (configs only, in a Hugging Face cache) under the sdxl
    profile: the disk total (checkpoints, best weights, model, hub download, caches of 1,000
    images) is under 64 GB, and the CLI prints memory and disk. In subprocesses: huggingface_hub
    reads HF_HUB_CACHE when it is imported."""
    write_sdxl_base(tmp_path / "hub", weights=False)
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "sdxl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    computed = run("-c", PLAN_1000_IMAGES, str(tmp_path / "params.yaml"))
    assert computed.returncode == 0, computed.stderr[-2000:]
    plan = json.loads(computed.stdout.strip().splitlines()[-1])
    assert plan["unet"] == 2_567_463_684
    assert set(plan["disk"]) == {"checkpoints", "best weights", "model", "caches", "hub download"}
    assert sum(plan["disk"].values()) < 64 * GB
    # The profile's GPU peak: 7.21 GB allocated on an H200 at 1024 px (benchmarks/sdxl_gpu_h200.json).
    assert plan["memory"]["total"] == pytest.approx(7.21, rel=0.03)
    # The CLI, as a user runs it (no caption table yet: the caches are left out, and said so).
    result = run("-m", "components.cli", "--params", str(tmp_path / "params.yaml"), "train", "--plan")
    assert result.returncode in (0, 2), result.stderr[-2000:]
    assert "checkpoints" in result.stdout and "11.25 GB" in result.stdout and "no caption table yet" in result.stdout
    assert ("fits" in result.stdout) if result.returncode == 0 else ("DOES NOT FIT" in result.stdout)


def test_the_memory_arithmetic_holds_every_measured_gpu_row():
    """Every row measured on a GPU (benchmarks/sdxl_gpu.py: recipes, 768 and 1024 px, batches 1 to
    4, with and without gradient checkpointing) against the plan's arithmetic for the same settings
    on the real SDXL U-Net's shapes. A change to the arithmetic, or to a recipe's memory (a new
    optimizer temporary, an EMA moved), that the measurements no longer support fails here; after
    measuring again, replace the JSON file."""
    from benchmarks.sdxl_gpu import rows, train_params
    from benchmarks.sdxl_rehearsal import unet_shapes
    from components.train.plan import memory_gb

    shapes = unet_shapes()
    measured = json.loads((REPO / "benchmarks" / "sdxl_gpu_h200.json").read_text())
    assert len(measured) >= 15 and {r["status"] for r in measured} == {"measured"}
    for row in measured:
        train, _ = train_params(rows()[row["config"]] | {"train_batch_size": row["batch"]}, row["resolution"])
        plan = memory_gb(train, shapes, device="cuda")["total"]
        where = (row["config"], row["resolution"], row["batch"])
        assert plan == pytest.approx(row["training_peak_gb"], rel=0.03), where
    # On the CPU the process itself is counted too.
    train, _ = train_params({}, 1024)
    on_gpu = memory_gb(train, shapes, device="cuda")["total"]
    assert memory_gb(train, shapes, device="cpu")["total"] == pytest.approx(on_gpu + 2)
