"""The train stage on the tiny SDXL: it learns, saves a pipeline that reloads and generates."""

import json
import random

import pandas as pd
import pytest
import torch
from PIL import Image

from components.config import TrainParams
from components.errors import EaselError
from components.models.loaders import load_sdxl_pipeline
from components.train import run_train
from components.train.data import resize_and_crop
from components.train.sdxl import time_ids
from tests.helpers import accepted_set
from tests.test_models import tiny_params


def captioned_set(tmp_path, count=4):
    download, validate = accepted_set(tmp_path, count=count, size=(96, 80))
    accepted = pd.read_parquet(validate / "accepted.parquet")
    caption_dir = tmp_path / "caption"
    caption_dir.mkdir()
    accepted.assign(caption=[f"a poster, style {i}" for i in range(count)]).to_parquet(caption_dir / "captions.parquet")
    return download, caption_dir


def test_train_saves_a_pipeline_that_reloads_and_generates(tmp_path, tiny_models):
    _, captions = captioned_set(tmp_path)
    params = TrainParams(
        out_dir=str(tmp_path / "train"), resolution=64, max_train_steps=6, train_batch_size=2, learning_rate=1e-4
    )
    summary = run_train(
        params,
        tiny_params(tiny_models),
        captions,
        tmp_path / "train.json",
        tmp_path / "plots",
        progress=False,
    )
    assert summary.steps == 6
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["steps"] == 6 and metrics["final_loss"] > 0
    loss_curve = pd.read_csv(tmp_path / "plots" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert len(loss_curve) == 6
    model = tmp_path / "train" / "model"
    card = (model / "README.md").read_text()
    assert "base_model:" in card and "fingerprint" in card
    pipe = load_sdxl_pipeline(str(model))
    image = pipe(
        prompt="a poster", num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    from safetensors.torch import load_file

    trained = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # the U-Net was trained
    for part in ("vae", "text_encoder", "text_encoder_2"):  # the frozen parts were not
        name = "diffusion_pytorch_model.safetensors" if part == "vae" else "model.safetensors"
        a, b = load_file(model / part / name), load_file(tiny_models / "sdxl" / part / name)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_nan_loss_stops_with_a_clear_message_and_saves_nothing(tmp_path, tiny_models):
    _, captions = captioned_set(tmp_path, count=2)
    params = TrainParams(
        out_dir=str(tmp_path / "train"),
        resolution=64,
        max_train_steps=3,
        train_batch_size=1,
        learning_rate=1e30,
        max_grad_norm=1e30,
    )
    with pytest.raises(EaselError, match="the loss became nan"):
        run_train(params, tiny_params(tiny_models), captions, progress=False)
    assert not (tmp_path / "train" / "model").exists()


def test_crop_conditioning_follows_the_crop_and_the_flip():
    image = Image.new("RGB", (200, 100))
    _, (top, left) = resize_and_crop(image, 64, center_crop=True, flip=False, rng=random.Random(0))
    assert (top, left) == (0, (128 - 64) // 2)  # resized to 128x64, centre crop
    rng = random.Random(3)
    _, (top, left) = resize_and_crop(image, 64, center_crop=False, flip=False, rng=rng)
    rng = random.Random(3)
    _, (top_f, left_f) = resize_and_crop(image, 64, center_crop=False, flip=True, rng=rng)
    assert top_f == top and left_f == 128 - left - 64  # the same crop, seen in the mirror
    ids = time_ids([(100, 200)], [(top, left)], (64, 64), torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[100, 200, top, left, 64, 64]]
