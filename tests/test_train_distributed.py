"""Training in two processes (torchrun + accelerate, a gloo group on the CPU): what runs on 8
GPUs under `accelerate launch` runs here on the same code path, only slower."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.test_models import tiny_params
from tests.test_train import UNET, captioned_set, train_params

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_two_processes(spec_path, **spec) -> None:
    spec_path.write_text(json.dumps(spec, default=str))
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "tests.ddp_train_worker", str(spec_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_train_and_resume_exactly(tmp_path, tiny_models):
    from safetensors.torch import load_file

    captions = captioned_set(tmp_path, sizes=[(96, 96)] * 4 + [(128, 64)] * 4)  # two buckets
    models = tiny_params(tiny_models).model_dump()
    common = dict(train_batch_size=2, checkpoint_every=3, random_flip=True, center_crop=False, log_every_n_steps=1)

    straight = train_params(tmp_path / "a", max_train_steps=6, **common).model_dump()
    train_two_processes(tmp_path / "a.json", train=straight, models=models, captions=captions, plots=tmp_path / "pa")

    # The same run stopped after 3 steps, then continued to 6 from its checkpoint.
    first = train_params(tmp_path / "b", max_train_steps=3, **common).model_dump()
    train_two_processes(tmp_path / "b1.json", train=first, models=models, captions=captions, plots=tmp_path / "pb")
    (run_dir,) = (tmp_path / "b" / "ckpt").iterdir()
    checkpoint = run_dir / "step-00000003"
    assert {p.name for p in checkpoint.glob("easel_generator_*.pt")} == {"easel_generator_0.pt", "easel_generator_1.pt"}
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    second = train_params(tmp_path / "b", max_train_steps=6, resume_from_checkpoint="latest", **common).model_dump()
    train_two_processes(tmp_path / "b2.json", train=second, models=models, captions=captions, plots=tmp_path / "pb")

    a = load_file(str(tmp_path / "a" / "train" / "model" / UNET))
    b = load_file(str(tmp_path / "b" / "train" / "model" / UNET))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    base = load_file(str(tiny_models / "sdxl" / UNET))
    assert any((a[k] - base[k]).abs().max().item() > 0 for k in base)  # it did train
    # One process writes the curves: each step once, the mean loss over both processes.
    losses_a = pd.read_csv(tmp_path / "pa" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    losses_b = pd.read_csv(tmp_path / "pb" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert losses_a["step"].tolist() == losses_b["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert losses_b["loss"].tolist() == pytest.approx(losses_a["loss"].tolist(), rel=1e-4)
