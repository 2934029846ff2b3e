"""The train stage on the tiny SDXL (CPU): buckets, captions, noise and loss maths, exact resume,
checkpoints, caches, EMA, validation, and a saved pipeline that reloads and generates."""

import json
import math
import multiprocessing
import random

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from components.config import BucketParams, TrainParams
from components.models.loaders import load_sdxl_pipeline
from components.plumbing.errors import EaselError
from components.train import run_train
from components.train.data import (
    BucketBatchSampler,
    assign_bucket,
    make_buckets,
    process_caption,
    resize_and_crop,
)
from components.train.optim import build_lr_scheduler, build_optimizer
from components.train.sdxl import min_snr_weights, offset_noise, time_ids
from tests.helpers import encode, make_caption_dir, noise, pickle_payload
from tests.test_models import tiny_params

UNET = "unet/diffusion_pytorch_model.safetensors"


def captioned_set(tmp_path, sizes=((96, 80), (80, 96), (128, 64), (96, 96), (90, 120), (120, 90))):
    files = {f"img{i}.png": encode(noise(w, h, seed=200 + i), "PNG", dpi=(96, 96)) for i, (w, h) in enumerate(sizes)}
    return make_caption_dir(
        tmp_path, files, [f"easelposter, a poster, style {i}, blue, sharp" for i in range(len(files))]
    )


def train_params(tmp_path, **kw) -> TrainParams:
    base = dict(
        out_dir=str(tmp_path / "train"),
        resolution=64,
        max_train_steps=6,
        train_batch_size=2,
        learning_rate=1e-4,
        checkpoint_dir=str(tmp_path / "ckpt"),
        cache_dir=str(tmp_path / "cache"),
        bucketing={"enabled": True, "min_size": 32, "max_size": 128, "step": 16},
    )
    return TrainParams(**(base | kw))


def unet_weights(model_dir):
    return load_file(str(model_dir / UNET))


def crash_at_training_loss(monkeypatch, call: int) -> None:
    """Make the `call`-th training loss (validation losses, computed in eval mode, not counted)
    raise, as a power cut would; undo with monkeypatch.undo()."""
    from components.train import loop

    original = loop.diffusion_loss
    calls = {"train": 0}

    def crashing(unet, *args, **kwargs):
        if unet.training:
            calls["train"] += 1
            if calls["train"] == call:
                raise RuntimeError("power cut")
        return original(unet, *args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", crashing)


# -- data ---------------------------------------------------------------------------------------


def test_buckets_and_assignment():
    params = BucketParams(min_size=512, max_size=2048, step=64)
    buckets = make_buckets(1024, params)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert (1024, 1024) in buckets
    assert assign_bucket(1000, 1000, buckets, params, 1024) == (1024, 1024)
    assert assign_bucket(600, 900, buckets, params, 1024) == (832, 1216)  # a 2:3 poster
    assert assign_bucket(1920, 1080, buckets, params, 1024) == (1344, 768)  # 16:9
    small = BucketParams(min_size=512, max_size=2048, step=64, no_upscale=True)
    assert assign_bucket(700, 500, buckets, small, 1024) == (640, 448)  # kept small, rounded down to 64


def test_batches_hold_one_bucket_and_every_image_once_per_epoch():
    bucket_of = [(64, 64), (48, 80), (64, 64), (80, 48), (64, 64), (48, 80), (64, 64)]
    sampler = BucketBatchSampler(bucket_of, batch_size=2, seed=3)
    first = sampler.batches()
    assert sorted(i for b in first for i in b) == list(range(7)) and len(first) == len(sampler) == 4
    assert all(len({bucket_of[i] for i in b}) == 1 for b in first)
    assert sampler.batches() == first  # the same epoch, the same order
    assert next(iter(sampler)) == [(0, i) for i in first[0]]  # keys carry the epoch to the dataset
    sampler.set_position(1, skip=1)
    assert sampler.batches() != first
    assert [[i for _, i in b] for b in sampler] == sampler.batches()[1:]  # a resumed epoch skips ahead
    assert {e for b in sampler for e, _ in b} == {1}


def test_processes_share_an_epoch_evenly():
    """Two processes: disjoint halves of the epoch's batches, padded to the same count."""
    bucket_of = [(64, 64)] * 5 + [(48, 80)] * 2  # 3 + 1 batches of 2 -> 4; with 2 images more -> 5
    for extra in (0, 2):
        buckets = bucket_of + [(80, 48)] * extra
        shards = [BucketBatchSampler(buckets, 2, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
        mine = [s.batches() for s in shards]
        assert len(mine[0]) == len(mine[1]) == len(shards[0]) == len(shards[1])
        every = shards[0].all_batches()
        assert {i for b in every for i in b} == set(range(len(buckets)))
        assert mine[0] + mine[1] == every[0::2] + every[1::2]
        if extra:  # an odd count: the first batch is repeated so both processes take 3 steps
            assert len(every) == 6 and every[-1] == every[0]


def test_keep_tokens_shuffle_and_dropout():
    caption = "trigger, a poster, red, blue, green, yellow"
    rng = random.Random(0)
    for _ in range(20):
        out = process_caption(caption, shuffle=True, keep_tokens=2, dropout=0.0, rng=rng).split(", ")
        assert out[:2] == ["trigger", "a poster"] and sorted(out[2:]) == ["blue", "green", "red", "yellow"]
    shuffled = {process_caption(caption, True, 2, 0.0, random.Random(s)) for s in range(20)}
    assert len(shuffled) > 5
    assert process_caption(caption, False, 0, 0.0, rng) == caption
    dropped = [process_caption(caption, False, 0, 0.3, random.Random(s)) for s in range(400)]
    assert 0.2 < dropped.count("") / 400 < 0.4


def test_crop_conditioning_follows_the_crop_and_the_flip():
    image = Image.new("RGB", (200, 100))
    _, (top, left) = resize_and_crop(image, (64, 64), center_crop=True, flip=False, rng=random.Random(0))
    assert (top, left) == (0, (128 - 64) // 2)  # resized to 128x64, centre crop
    _, (top, left) = resize_and_crop(image, (64, 64), center_crop=False, flip=False, rng=random.Random(3))
    _, (top_f, left_f) = resize_and_crop(image, (64, 64), center_crop=False, flip=True, rng=random.Random(3))
    assert top_f == top and left_f == 128 - left - 64  # the same crop, seen in the mirror
    ids = time_ids([(100, 200)], [(top, left)], [(64, 64)], torch.device("cpu"))
    assert ids.tolist() == [[100, 200, top, left, 64, 64]]


# -- maths ---------------------------------------------------------------------------------------


def test_noise_offset_adds_one_shift_per_sample_and_channel():
    latents = torch.zeros(2, 4, 3, 3)
    plain = offset_noise(latents, 0.0, torch.Generator().manual_seed(0))
    shifted = offset_noise(latents, 0.1, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 3, 3, generator=generator)
    shift = torch.randn(2, 4, 1, 1, generator=generator)
    assert torch.equal(plain, base)
    assert torch.allclose(shifted, base + 0.1 * shift)
    delta = shifted - base
    assert torch.allclose(delta, delta[..., :1, :1].expand_as(delta))  # constant over the pixels


def test_min_snr_weights_by_hand():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([10, 500, 990])
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    gamma = 5.0
    expected_eps = torch.minimum(snr, torch.tensor(gamma)) / snr
    expected_v = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)
    assert torch.allclose(min_snr_weights(scheduler, t, gamma, "epsilon"), expected_eps)
    assert torch.allclose(min_snr_weights(scheduler, t, gamma, "v_prediction"), expected_v)
    assert min_snr_weights(scheduler, t, gamma, "epsilon")[0] < 1.0  # low noise: down-weighted
    assert min_snr_weights(scheduler, t, gamma, "epsilon")[2] == pytest.approx(1.0)  # high noise: SNR < gamma


def test_optimizers_and_schedules():
    weights = [torch.nn.Parameter(torch.zeros(3))]
    ada = build_optimizer(weights, TrainParams(optimizer="adafactor", optimizer_args={"clip_threshold": 1.0}))
    assert type(ada).__name__ == "Adafactor" and ada.defaults["clip_threshold"] == 1.0
    cosine = TrainParams(
        lr_scheduler="cosine_with_restarts", lr_scheduler_args={"num_cycles": 2}, max_train_steps=100, learning_rate=1.0
    )
    sgd = torch.optim.SGD(weights, lr=1.0)
    sched = build_lr_scheduler(sgd, cosine)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        sgd.step()  # in training's order (no gradients: nothing moves), so torch does not warn
        sched.step()
    assert lrs[0] == 1.0 and min(lrs[:50]) < 0.01 and lrs[50] == pytest.approx(1.0)  # two cycles
    with pytest.raises(EaselError, match="adamw8bit needs bitsandbytes"):
        build_optimizer(weights, TrainParams(optimizer="adamw8bit"))
    with pytest.raises(EaselError, match=r"\['clip_threshold'\] do not apply to adamw"):
        build_optimizer(weights, TrainParams(optimizer_args={"clip_threshold": 1.0}))


# -- runs ----------------------------------------------------------------------------------------


def test_train_saves_a_pipeline_that_reloads_and_generates(tmp_path, tiny_models):
    captions = captioned_set(tmp_path)
    params = train_params(
        tmp_path, save_precision="fp16", sample_every_n_steps=3, sample_prompts=["a poster"], sample_steps=2
    )
    summary = run_train(
        params, tiny_params(tiny_models), captions, tmp_path / "train.json", tmp_path / "plots", progress=False
    )
    assert summary.steps == 6
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["steps"] == 6 and metrics["final_loss"] > 0 and metrics["peak_memory_mb"] > 0
    curves = tmp_path / "plots" / "plots" / "metrics" / "train"
    assert len(pd.read_csv(curves / "loss.tsv", sep="\t")) == 6
    assert {p.name for p in curves.iterdir()} >= {
        "loss.tsv",
        "lr.tsv",
        "grad_norm.tsv",
        "images_per_second.tsv",
        "peak_memory_mb.tsv",
        "step_seconds.tsv",
    }
    assert sorted(p.name for p in (tmp_path / "train" / "samples").iterdir()) == ["step-00000003", "step-00000006"]
    model = tmp_path / "train" / "model"
    assert "base_model:" in (model / "README.md").read_text()
    trained, base = unet_weights(model), unet_weights(tiny_models / "sdxl")
    assert all(v.dtype == torch.float16 for v in trained.values())  # save_precision
    assert any(not torch.equal(trained[k].float(), base[k]) for k in base)  # the U-Net was trained
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(str(model / part / name)), load_file(str(tiny_models / "sdxl" / part / name))
        assert all(torch.equal(a[k], b[k]) for k in b)  # the frozen parts were not
    pipe = load_sdxl_pipeline(str(model))
    image = pipe(
        prompt="a poster", num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_resume_is_exact(tmp_path, tiny_models, monkeypatch):
    """2N steps straight == the same run cut off after N (a crash), resumed from its checkpoint;
    the resumed run's curves hold each step once, with the straight run's losses. Two micro-batches
    per optimizer step, so the resumed data position counts micro-batches right."""
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    common = dict(
        max_train_steps=8,
        train_batch_size=1,
        gradient_accumulation_steps=2,
        shuffle_caption=True,
        keep_tokens=1,
        caption_dropout=0.2,
        random_flip=True,
        center_crop=False,
        noise_offset=0.05,
        min_snr_gamma=5.0,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        ema={"enabled": True, "decay": 0.9},
        checkpoint_every=4,
        log_every_n_steps=1,
    )
    run_train(train_params(tmp_path / "a", **common), models, captions, plots_dir=tmp_path / "a-plots", progress=False)

    # after the checkpoint at 4 and two more logged steps: step 7's first micro-batch
    crash_at_training_loss(monkeypatch, 13)
    with pytest.raises(RuntimeError, match="power cut"):
        run_train(
            train_params(tmp_path / "b", **common), models, captions, plots_dir=tmp_path / "b-plots", progress=False
        )
    monkeypatch.undo()
    summary = run_train(
        train_params(tmp_path / "b", resume_from_checkpoint="latest", **common),
        models,
        captions,
        plots_dir=tmp_path / "b-plots",
        progress=False,
    )
    assert summary.steps == 8
    a, b = unet_weights(tmp_path / "a" / "train" / "model"), unet_weights(tmp_path / "b" / "train" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    curve_a, curve_b = (
        pd.read_csv(tmp_path / run / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
        for run in ("a-plots", "b-plots")
    )
    assert curve_b["step"].tolist() == list(range(1, 9))
    assert curve_b["loss"].tolist() == pytest.approx(curve_a["loss"].tolist(), rel=1e-4)


# Every name a pickle goes by in accelerate's save_state folders and Easel's older checkpoints.
PLANTED = (
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "pytorch_model.bin",
    "scaler.pt",
    "easel_generator_0.pt",
)


def test_a_checkpoint_never_runs_what_its_files_say(tmp_path, tiny_models):
    """A checkpoint is data only (JSON and safetensors). Pickles planted under every name accelerate
    and older Easel used are never opened; a folder in accelerate's format, or another run's
    checkpoint, is refused in one line naming why; the planted code never runs."""
    captions, models = captioned_set(tmp_path), tiny_params(tiny_models)
    common = dict(checkpoint_every=2, ema={"enabled": True, "decay": 0.9})
    run_train(train_params(tmp_path / "a", max_train_steps=2, **common), models, captions, progress=False)
    (run_dir,) = (tmp_path / "a" / "ckpt").iterdir()
    checkpoint = run_dir / "step-00000002"
    assert {p.suffix for p in checkpoint.iterdir()} == {".json", ".safetensors"}
    ran = tmp_path / "payload-ran"
    for name in PLANTED:
        (checkpoint / name).write_bytes(pickle_payload(ran))
    resumed = train_params(tmp_path / "a", max_train_steps=4, resume_from_checkpoint="latest", **common)
    assert run_train(resumed, models, captions, progress=False).steps == 4

    accelerate_folder = tmp_path / "shared-disk" / "checkpoint"  # the crafted folder
    accelerate_folder.mkdir(parents=True)
    (accelerate_folder / "easel_checkpoint.json").write_text(json.dumps({"step": 2, "run": run_dir.name}))
    for name in PLANTED:
        (accelerate_folder / name).write_bytes(pickle_payload(ran))
    crafted = train_params(tmp_path / "a", max_train_steps=6, resume_from_checkpoint=str(accelerate_folder), **common)
    with pytest.raises(EaselError, match="older Easel checkpoint in accelerate's pickle files, which are not read"):
        run_train(crafted, models, captions, progress=False)

    other = train_params(
        tmp_path / "c", learning_rate=3e-4, max_train_steps=6, resume_from_checkpoint=str(checkpoint), **common
    )
    refused = rf"belongs to run {run_dir.name}, not this run .*differs: train\.learning_rate$"
    with pytest.raises(EaselError, match=refused):
        run_train(other, models, captions, progress=False)
    assert not ran.exists()


def test_a_cache_file_that_is_not_safetensors_is_made_again_never_unpickled(tmp_path, tiny_models):
    """Latent and text-embedding cache files swapped for pickles (or cut short): each is encoded again,
    and the pickle never runs."""
    from components.plumbing.tensor_tree import check_safetensors

    captions, models = captioned_set(tmp_path), tiny_params(tiny_models)
    common = dict(max_train_steps=2, cache_latents=True, cache_text_embeddings=True)
    run_train(train_params(tmp_path, **common), models, captions, progress=False)
    cached = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert {p.parent.parent.name for p in cached} >= {"latents"} and len(cached) > 6
    ran = tmp_path / "payload-ran"
    for path in cached[::2]:
        path.write_bytes(pickle_payload(ran))
    for path in cached[1::4]:
        path.write_bytes(path.read_bytes()[:-10])
    assert run_train(train_params(tmp_path, **common), models, captions, progress=False).steps == 2
    for path in cached:
        check_safetensors(path)  # made again, whole
    assert not ran.exists()


def test_checkpoints_rotate(tmp_path, tiny_models):
    captions = captioned_set(tmp_path)
    run_train(
        train_params(tmp_path, max_train_steps=7, checkpoint_every=2, keep_checkpoints=2),
        tiny_params(tiny_models),
        captions,
        progress=False,
    )
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["step-00000004", "step-00000006"]
    assert (run_dir / "step-00000006" / "easel_checkpoint.json").is_file()


def test_nan_loss_stops_and_leaves_the_last_good_checkpoint(tmp_path, tiny_models, monkeypatch):
    from components.train import loop

    captions = captioned_set(tmp_path)
    original = loop.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "diffusion_loss", poisoned)
    with pytest.raises(EaselError, match=r"the loss became nan at step 5.*last good checkpoint is .*step-00000004"):
        run_train(
            train_params(tmp_path, max_train_steps=8, checkpoint_every=2),
            tiny_params(tiny_models),
            captions,
            progress=False,
        )
    assert not (tmp_path / "train" / "model").exists()
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert (run_dir / "step-00000004" / "easel_checkpoint.json").is_file()


def test_cached_latents_and_text_embeddings_train_the_same(tmp_path, tiny_models):
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    run_train(train_params(tmp_path / "plain"), models, captions, progress=False)
    cached = train_params(
        tmp_path / "cached", cache_latents=True, cache_text_embeddings=True, cache_dir=str(tmp_path / "cache")
    )
    run_train(cached, models, captions, progress=False)
    files = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert (
        len([f for f in files if f.parts[0] == "latents"]) == 6 and len([f for f in files if f.parts[0] == "text"]) == 6
    )
    a = unet_weights(tmp_path / "plain" / "train" / "model")
    b = unet_weights(tmp_path / "cached" / "train" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # the same training, without the VAE in the loop
    # Again from the caches alone, read by a DataLoader worker process and without the RAM tier:
    # the same weights, and nothing new cached.
    again = cached.model_copy(
        update={"out_dir": str(tmp_path / "again"), "dataloader_num_workers": 1, "cache_memory_mb": 0}
    )
    run_train(again, models, captions, progress=False)
    assert multiprocessing.active_children() == []  # the DataLoader's worker ended with the training
    c = unet_weights(tmp_path / "again" / "model")
    assert max((b[k] - c[k]).abs().max().item() for k in b) < 1e-6
    assert sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*.safetensors")) == files


def test_validation_keeps_the_best_and_ema_changes_the_saved_weights(tmp_path, tiny_models):
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    params = train_params(tmp_path / "v", max_train_steps=6, validation={"fraction": 0.34, "every_n_steps": 2})
    summary = run_train(params, models, captions, tmp_path / "m.json", tmp_path / "plots", progress=False)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert summary.best_val_loss is not None and metrics["best_step"] in (2, 4, 6)
    val = pd.read_csv(tmp_path / "plots" / "plots" / "metrics" / "val" / "loss.tsv", sep="\t")
    assert len(val) == 3 and metrics["best_val_loss"] == pytest.approx(val["loss"].min())
    card = json.loads((tmp_path / "v" / "train" / "model" / "easel_train.json").read_text())
    assert card["validation_images"] == 2 and card["images"] == 4
    # The base model's held-out loss (before any step), for the gate; the saved weights' is the best one.
    assert math.isfinite(card["base_val_loss"]) and card["base_val_loss"] != card["best_val_loss"]
    assert card["saved_val_loss"] == card["best_val_loss"] and card["final_val_loss"] == val["loss"].iloc[-1]
    assert metrics["base_val_loss"] == card["base_val_loss"]
    (run_dir,) = (tmp_path / "v" / "ckpt").iterdir()
    assert json.loads((run_dir / "best" / "best.json").read_text())["step"] == metrics["best_step"]
    # one best file is left: the others were removed as better ones came
    (best_file,) = (run_dir / "best").glob("*.safetensors")
    best = load_file(str(best_file))
    saved = unet_weights(tmp_path / "v" / "train" / "model")
    assert all(torch.equal(best[k], saved[k]) for k in best)  # the saved model is the best one

    raw = train_params(tmp_path / "raw", max_train_steps=4)
    ema = train_params(tmp_path / "ema", max_train_steps=4, ema={"enabled": True, "decay": 0.5})
    run_train(raw, models, captions, progress=False)
    run_train(ema, models, captions, progress=False)
    a, b = unet_weights(tmp_path / "raw" / "train" / "model"), unet_weights(tmp_path / "ema" / "train" / "model")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "ema" / "train" / "model" / "easel_train.json").read_text())["weights"] == "ema"


def test_a_resumed_run_saves_the_best_weights_found_before_the_crash(tmp_path, tiny_models, monkeypatch):
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    # A high learning rate, so validation loss bottoms out early (at step 6 with these seeds).
    common = dict(
        max_train_steps=8, learning_rate=1e-2, checkpoint_every=3, validation={"fraction": 0.34, "every_n_steps": 1}
    )
    straight = run_train(train_params(tmp_path / "a", **common), models, captions, progress=False)
    card = json.loads((tmp_path / "a" / "train" / "model" / "easel_train.json").read_text())
    assert card["best_step"] <= 6, "precondition: the best step comes before the crash below"

    crash_at_training_loss(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="power cut"):
        run_train(train_params(tmp_path / "b", **common), models, captions, progress=False)
    monkeypatch.undo()
    resumed = run_train(
        train_params(tmp_path / "b", resume_from_checkpoint="latest", **common), models, captions, progress=False
    )
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss)
    resumed_card = json.loads((tmp_path / "b" / "train" / "model" / "easel_train.json").read_text())
    assert resumed_card["base_val_loss"] == card["base_val_loss"]  # kept in the checkpoint, not measured again
    a, b = unet_weights(tmp_path / "a" / "train" / "model"), unet_weights(tmp_path / "b" / "train" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # the best weights, not the last ones


def test_bf16_training_then_float32_in_the_same_process(tmp_path, tiny_models):
    """bf16 autocast runs on the CPU too; a second run in the process may use another precision."""
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    bf16 = train_params(tmp_path / "bf16", max_train_steps=2, mixed_precision="bf16", save_precision="bf16")
    assert math.isfinite(run_train(bf16, models, captions, progress=False).final_loss)
    assert all(v.dtype == torch.bfloat16 for v in unet_weights(tmp_path / "bf16" / "train" / "model").values())
    full = train_params(tmp_path / "full", max_train_steps=2)
    assert math.isfinite(run_train(full, models, captions, progress=False).final_loss)
    assert all(v.dtype == torch.float32 for v in unet_weights(tmp_path / "full" / "train" / "model").values())


MEMORY_OPTIONS = {
    # kohya's 10 GB recipe: bf16 weights, Adafactor stepped inside backward; the EMA in CPU memory, bf16
    "full_bf16-adafactor-fused-ema_cpu_bf16": dict(
        full_bf16=True,
        optimizer="adafactor",
        fused_backward_pass=True,
        max_grad_norm=None,
        ema={"enabled": True, "decay": 0.9, "device": "cpu", "dtype": "bf16", "update_every": 2},
    ),
    "full_bf16-adamw-ema_accelerator": dict(
        full_bf16=True, optimizer="adamw", ema={"enabled": True, "decay": 0.9, "device": "accelerator"}
    ),
    # fp32 master weights, but no full set of gradients
    "mixed_bf16-adamw-fused-ema_cpu": dict(
        optimizer="adamw", fused_backward_pass=True, max_grad_norm=None, ema={"enabled": True, "device": "cpu"}
    ),
}


@pytest.mark.parametrize("option", list(MEMORY_OPTIONS))
def test_memory_options_train_sample_validate_and_resume_exactly(tmp_path, tiny_models, monkeypatch, option):
    """Each memory option through the whole trainer, with cached latents and embeddings (so the
    frozen parts leave memory and come back for samples and the save), validation keeping the best
    weights, sample images, EMA, and a crash after the checkpoint at step 3: the resumed run ends
    with the weights, best step and losses of the uninterrupted one."""
    captions = captioned_set(tmp_path)
    models = tiny_params(tiny_models)
    common = dict(
        max_train_steps=6,
        mixed_precision="bf16",
        save_precision="bf16",
        cache_latents=True,
        cache_text_embeddings=True,
        checkpoint_every=3,
        sample_every_n_steps=3,
        sample_prompts=["a poster"],
        sample_steps=2,
        validation={"fraction": 0.34, "every_n_steps": 2},
        log_every_n_steps=1,
        **MEMORY_OPTIONS[option],
    )
    straight = run_train(
        train_params(tmp_path / "a", **common), models, captions, tmp_path / "a.json", tmp_path / "pa", progress=False
    )
    crash_at_training_loss(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="power cut"):
        run_train(train_params(tmp_path / "b", **common), models, captions, plots_dir=tmp_path / "pb", progress=False)
    monkeypatch.undo()
    resumed = run_train(
        train_params(tmp_path / "b", resume_from_checkpoint="latest", **common),
        models,
        captions,
        tmp_path / "b.json",
        tmp_path / "pb",
        progress=False,
    )
    assert resumed.steps == straight.steps == 6 and resumed.best_val_loss == pytest.approx(straight.best_val_loss)
    a, b = unet_weights(tmp_path / "a" / "train" / "model"), unet_weights(tmp_path / "b" / "train" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, stochastic rounding included
    base = unet_weights(tiny_models / "sdxl")
    assert sum(not torch.equal(a[k].float(), base[k].bfloat16().float()) for k in base) > len(base) // 2  # trained
    losses = [pd.read_csv(tmp_path / d / "plots" / "metrics" / "train" / "loss.tsv", sep="\t") for d in ("pa", "pb")]
    assert losses[1]["step"].tolist() == list(range(1, 7))
    assert losses[1]["loss"].tolist() == pytest.approx(losses[0]["loss"].tolist(), rel=1e-5)
    for run in ("a", "b"):
        samples = tmp_path / run / "train" / "samples"
        assert sorted(p.name for p in samples.iterdir()) == ["step-00000003", "step-00000006"]
        assert Image.open(samples / "step-00000006" / "00.png").size == (64, 64)
    card = json.loads((tmp_path / "b" / "train" / "model" / "easel_train.json").read_text())
    assert card["weights"] == "ema" and card["best_step"] in (2, 4, 6)
    vae = load_file(str(tmp_path / "b" / "train" / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_base = load_file(str(tiny_models / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae[k], vae_base[k]) for k in vae_base)  # released, reloaded, saved unchanged


def test_bad_settings_are_refused():
    for settings, message in (
        (dict(full_bf16=True), r"full_bf16 needs mixed_precision: bf16"),
        (dict(full_bf16=True, mixed_precision="bf16", optimizer="adamw8bit"), r"full_bf16 works with optimizer"),
        (dict(fused_backward_pass=True, gradient_accumulation_steps=2, max_grad_norm=None), "accumulation_steps > 1"),
        (dict(fused_backward_pass=True), r"fused_backward_pass cannot clip by the global gradient norm"),
        (dict(fused_backward_pass=True, max_grad_norm=None, mixed_precision="fp16"), "mixed_precision fp16"),
        (dict(ema={"device": "gpu"}), r"accelerator"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainParams(**settings)
    with pytest.raises(ValueError, match="cache_latents needs center_crop"):
        TrainParams(cache_latents=True, center_crop=False)
    with pytest.raises(ValueError, match="cache_text_embeddings cannot be used with shuffle_caption"):
        TrainParams(cache_text_embeddings=True, shuffle_caption=True)
    with pytest.raises(ValueError, match="min_timestep"):
        TrainParams(min_timestep=500, max_timestep=400)


def test_image_sizes_drive_the_buckets_used(tmp_path, tiny_models):
    captions = captioned_set(tmp_path)
    from components.train.loop import Trainer, load_training_items

    trainer = Trainer(train_params(tmp_path), tiny_params(tiny_models), load_training_items(captions), progress=False)
    used = trainer._bucket_of(trainer.train_items)
    assert len(set(used)) >= 3  # portrait, landscape and square images train in their own shapes
    assert np.all([w % 16 == 0 and h % 16 == 0 for w, h in used])


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "cosine", "polynomial"])
def test_a_fused_backward_run_resumes_on_its_schedule(tmp_path, tiny_models, monkeypatch, schedule):
    """The fused pass steps parameters from hooks that read the optimizer's param groups; a resume
    replaces those groups. Resumed at step 2 of a 4-step warm-up, the run must go on at the
    scheduled learning rates (not 0) and end with the uninterrupted run's weights."""
    captions, models = captioned_set(tmp_path), tiny_params(tiny_models)
    common = dict(
        max_train_steps=6,
        optimizer="adamw",
        fused_backward_pass=True,
        max_grad_norm=None,
        lr_scheduler=schedule,
        lr_warmup_steps=4,
        checkpoint_every=2,
        log_every_n_steps=1,
    )
    run_train(train_params(tmp_path / "a", **common), models, captions, progress=False)
    crash_at_training_loss(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="power cut"):
        run_train(train_params(tmp_path / "b", **common), models, captions, progress=False)
    monkeypatch.undo()
    run_train(train_params(tmp_path / "b", resume_from_checkpoint="latest", **common), models, captions, progress=False)
    a, b = unet_weights(tmp_path / "a" / "train" / "model"), unet_weights(tmp_path / "b" / "train" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_noise_and_micro_conditioning_are_float32_whatever_the_training_precision():
    """bf16 latents at the first timesteps: the U-Net gets latents noised as a float32 reference
    computes them (in bf16, alphas_cumprod rounds to 1 and they would get no noise), and SDXL's size
    conditioning exactly (777, not bf16's 776)."""
    from components.train.sdxl import diffusion_loss

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    ids = time_ids([(777, 1023)] * 2, [(0, 0)] * 2, [(1024, 1024)] * 2, torch.device("cpu"))
    assert ids.dtype == torch.float32 and ids[0].tolist() == [777, 1023, 0, 0, 1024, 1024]
    seen = {}

    def unet(noisy, timesteps, encoder_hidden_states, added_cond_kwargs, return_dict):
        seen["noisy"] = noisy
        return (torch.zeros_like(noisy),)

    for t in (0, 1, 2):
        embeds, pooled = torch.zeros(2, 77, 8).bfloat16(), torch.zeros(2, 8).bfloat16()
        diffusion_loss(
            unet, scheduler, latents, embeds, pooled, ids, timestep_range=(t, t + 1), generator=torch.Generator()
        )
        noise = offset_noise(latents.float(), 0.0, torch.Generator())  # the same first draw
        alpha = scheduler.alphas_cumprod[t].double()
        reference = alpha.sqrt() * latents.double() + (1 - alpha).sqrt() * noise.double()
        assert seen["noisy"].dtype == torch.bfloat16
        assert torch.allclose(seen["noisy"].double(), reference, rtol=2**-7, atol=1e-3), t


def test_a_v_prediction_model_is_saved_sampled_and_exported_as_v_prediction(tmp_path, tiny_models):
    """The saved pipeline's scheduler, what loads it (evaluation, samples), and the single-file export
    (ComfyUI and Forge read `"v_pred" in state_dict`) all say v-prediction, and the export reads back so."""
    from safetensors import safe_open

    from components.models.single_file import export_single_file, load_single_file_pipeline

    captions, models = captioned_set(tmp_path), tiny_params(tiny_models)
    v_params = train_params(tmp_path, max_train_steps=1, prediction_type="v_prediction")
    run_train(v_params, models, captions, progress=False)
    model = tmp_path / "train" / "model"
    saved = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    assert load_sdxl_pipeline(str(model)).scheduler.config.prediction_type == "v_prediction"
    exported = export_single_file(model, tmp_path / "poster-v.safetensors", "fp32")
    with safe_open(str(exported), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "v_pred" in keys and metadata["modelspec.prediction_type"] == "v"
    back = load_single_file_pipeline(exported, str(tiny_models / "sdxl"))
    assert back.scheduler.config.prediction_type == "v_prediction"


def test_the_frozen_parts_are_saved_as_the_base_holds_them(tmp_path, tiny_models):
    """bf16 training casts the text encoders to bf16 (and may release them); the saved model folder
    still carries the base's VAE and encoders bit for bit, so its fingerprint, registry version and
    export change only where training changed something: the U-Net."""
    captions, models = captioned_set(tmp_path), tiny_params(tiny_models)
    params = train_params(tmp_path, max_train_steps=1, mixed_precision="bf16", cache_text_embeddings=True)
    run_train(params, models, captions, progress=False)
    for part, name in (
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("text_encoder_2", "model.safetensors"),
    ):
        saved = load_file(str(tmp_path / "train" / "model" / part / name))
        base = load_file(str(tiny_models / "sdxl" / part / name))
        assert saved.keys() == base.keys(), part
        assert all(saved[k].dtype == base[k].dtype and torch.equal(saved[k], base[k]) for k in base), part


def test_validation_judges_the_weights_that_are_saved(tmp_path, tiny_models):
    """With the EMA saved, validation (so the best step and the gate's saved_val_loss) measures the
    EMA's weights, not the raw U-Net's. An EMA not updated yet still holds the base weights: its
    held-out loss is the base model's, however far the raw U-Net has moved."""
    captions, models = captioned_set(tmp_path), tiny_params(tiny_models)
    params = train_params(
        tmp_path,
        max_train_steps=4,
        learning_rate=1e-3,
        validation={"fraction": 0.34, "every_n_steps": 2},
        ema={"enabled": True, "update_every": 100},
    )
    run_train(params, models, captions, progress=False)
    card = json.loads((tmp_path / "train" / "model" / "easel_train.json").read_text())
    assert card["weights"] == "ema"
    assert card["final_val_loss"] == card["saved_val_loss"] == card["base_val_loss"]
