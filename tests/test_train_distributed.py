"""Every accelerate config in infra/accelerate/ launched with `accelerate launch`, on the CPU.

- ddp_8gpu.yaml with `--num_processes 2` (two CPU processes, a gloo group: ACCELERATE_USE_CPU=true):
  the code path of 8 GPUs, only slower;
- multinode_2x8gpu.yaml as two "nodes" on this machine (`--machine_rank 0|1`, one process each,
  the rendezvous on 127.0.0.1);
- single_gpu.yaml as it is (on a machine without a GPU accelerate runs it on the CPU).
The overrides are the process counts and addresses that a CPU machine needs instead of GPUs.
FSDP and DeepSpeed configs are not shipped: accelerate 1.15 runs FSDP only on GPUs, and DeepSpeed
is not installed (infra/README.md).
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.test_models import tiny_params
from tests.test_train import UNET, captioned_set, train_params

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "infra", "accelerate")


def launch(config: str, spec_path, options=(), cpu_group=True, **spec) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file infra/accelerate/<config> [options] -m tests.ddp_train_worker`."""
    spec_path.write_text(json.dumps(spec, default=str))
    env = os.environ | {"OMP_NUM_THREADS": "1"} | ({"ACCELERATE_USE_CPU": "true"} if cpu_group else {})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config)]
    command += [*options, "-m", "tests.ddp_train_worker", str(spec_path)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def launched(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def weights(folder):
    return load_file(str(folder / "train" / "model" / UNET))


def test_ddp_and_multinode_configs_train_the_same_and_resume_exactly(tmp_path, tiny_models):
    """Two processes with bf16 weights (stochastic rounding) and an EMA: a run stopped after 3 steps
    and resumed ends with the weights of a straight run, and two one-process "nodes" under the
    multi-node config train exactly what two processes on one node do. Only the main process keeps
    the EMA (one copy of the U-Net, not one per process); it validates the average and the others
    receive its loss."""
    captions = captioned_set(tmp_path, sizes=[(96, 96)] * 4 + [(128, 64)] * 4)  # two buckets
    models = tiny_params(tiny_models).model_dump()
    common = dict(
        train_batch_size=2,
        checkpoint_every=3,
        random_flip=True,
        center_crop=False,
        log_every_n_steps=1,
        mixed_precision="bf16",
        full_bf16=True,
        optimizer="adafactor",
        ema={"enabled": True, "decay": 0.9},
        validation={"fraction": 0.25, "every_n_steps": 2, "keep_best": True},
    )
    ddp = ["--num_processes", "2"]

    def spec(folder, **kw):
        return dict(
            train=train_params(tmp_path / folder, **common, **kw).model_dump(), models=models, captions=captions
        )

    straight = spec("a", max_train_steps=6) | {"ema_record": tmp_path / "ema-a"}
    launched(launch("ddp_8gpu.yaml", tmp_path / "a.json", ddp, **straight, plots=tmp_path / "pa"))
    assert [p.name for p in (tmp_path / "ema-a").iterdir()] == ["rank-0"]
    # The same run stopped after 3 steps, then continued to 6 from its checkpoint.
    launched(launch("ddp_8gpu.yaml", tmp_path / "b1.json", ddp, **spec("b", max_train_steps=3), plots=tmp_path / "pb"))
    (run_dir,) = (tmp_path / "b" / "ckpt").iterdir()
    checkpoint = run_dir / "step-00000003"
    # Each process's random states, and nothing a loader would unpickle.
    rng_files = {f"rng_{rank}.{kind}" for rank in (0, 1) for kind in ("json", "safetensors")}
    assert {p.name for p in checkpoint.glob("rng_*")} == rng_files
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin", ".pt", ".pth", ".ckpt")]
    second = spec("b", max_train_steps=6, resume_from_checkpoint="latest")
    launched(launch("ddp_8gpu.yaml", tmp_path / "b2.json", ddp, **second, plots=tmp_path / "pb"))
    # Two nodes of one process each, meeting on this machine.
    port = str(free_port())
    address = ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
    nodes = [["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), *address] for rank in (0, 1)]
    node_spec = spec("m", max_train_steps=6)
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda rank: launch(
                    "multinode_2x8gpu.yaml", tmp_path / f"m{rank}.json", nodes[rank], **node_spec, plots=tmp_path / "pm"
                ),
                (0, 1),
            )
        )
    for result in results:
        launched(result)

    a, b, m = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "m")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], m[k]) for k in a)
    base = load_file(str(tiny_models / "sdxl" / UNET))
    assert any((a[k] - base[k]).abs().max().item() > 0 for k in base)  # it did train
    # One process writes the curves: each step once, the mean loss over both processes.
    losses = {
        run: pd.read_csv(tmp_path / run / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
        for run in ("pa", "pb", "pm")
    }
    assert losses["pa"]["step"].tolist() == losses["pb"]["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert losses["pb"]["loss"].tolist() == pytest.approx(losses["pa"]["loss"].tolist(), rel=1e-4)
    assert losses["pm"]["loss"].tolist() == pytest.approx(losses["pa"]["loss"].tolist(), rel=1e-4)
    # The EMA's validation losses, computed by the main process: the same in every run (the stopped
    # run also validated at its last step, 3), and the best of them is the step whose weights were saved.
    val = {
        run: pd.read_csv(tmp_path / run / "plots" / "metrics" / "val" / "loss.tsv", sep="\t").set_index("step")["loss"]
        for run in losses
    }
    assert val["pa"].index.tolist() == [2, 4, 6] and val["pb"].index.tolist() == [2, 3, 4, 6]
    for run in ("pb", "pm"):
        assert val[run].loc[[2, 4, 6]].tolist() == pytest.approx(val["pa"].tolist(), rel=1e-4)
    card = json.loads((tmp_path / "a" / "train" / "model" / "easel_train.json").read_text())
    assert card["weights"] == "ema" and card["best_val_loss"] == pytest.approx(val["pa"].min())


def test_single_gpu_config_runs_the_lean_recipe(tmp_path, tiny_models):
    """single_gpu.yaml unchanged (no GPU here: accelerate runs it on the CPU), with the sdxl
    profile's memory recipe: bf16 weights, Adafactor stepped inside backward, EMA in CPU memory."""
    captions = captioned_set(tmp_path)
    recipe = train_params(
        tmp_path / "s",
        max_train_steps=4,
        mixed_precision="bf16",
        full_bf16=True,
        optimizer="adafactor",
        fused_backward_pass=True,
        max_grad_norm=None,
        cache_latents=True,
        cache_text_embeddings=True,
        ema={"enabled": True, "device": "cpu", "update_every": 2},
    )
    spec = dict(train=recipe.model_dump(), models=tiny_params(tiny_models).model_dump(), captions=captions)
    launched(launch("single_gpu.yaml", tmp_path / "s.json", cpu_group=False, **spec, plots=tmp_path / "ps"))
    trained = weights(tmp_path / "s")
    assert {v.dtype for v in trained.values()} == {torch.float32}  # save_precision float
    assert len(pd.read_csv(tmp_path / "ps" / "plots" / "metrics" / "train" / "grad_norm.tsv", sep="\t")) == 4


def test_fused_backward_pass_is_refused_with_several_processes(tmp_path, tiny_models):
    captions = captioned_set(tmp_path, sizes=[(96, 96)] * 2)
    params = train_params(tmp_path, max_train_steps=2, fused_backward_pass=True, max_grad_norm=None)
    spec = dict(train=params.model_dump(), models=tiny_params(tiny_models).model_dump(), captions=captions)
    result = launch("ddp_8gpu.yaml", tmp_path / "f.json", ["--num_processes", "2"], **spec, plots=tmp_path / "pf")
    assert result.returncode != 0
    assert "train.fused_backward_pass works in one process only" in result.stderr
