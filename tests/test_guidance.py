"""Guidance correctness on the tiny SDXL (CPU): the document's identities, checked numerically."""

import numpy as np
import pytest
import torch

from components.models.loaders import load_sdxl_pipeline
from components.sdxl.generation import GenerationSettings, generate
from components.sdxl.guidance import Guidance

PROMPTS = ["a poster of a cat in a travel bag", "four amber bottles, skincare ad"]
NEGATIVES = ["blurry, low quality", "text, watermark"]
SEEDS = [0, 7]
TOL = 1e-5  # float32 on the CPU; the images are in [0, 1]


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_sdxl_pipeline(str(tiny_models / "sdxl"))


def ours(pipe, **guidance):
    settings = GenerationSettings(num_inference_steps=4, height=64, width=64, guidance=Guidance(**guidance))
    return generate(pipe, PROMPTS, NEGATIVES, SEEDS, settings, output_type="np")


def diffusers(pipe, negative: bool):
    return pipe(
        prompt=PROMPTS,
        negative_prompt=NEGATIVES if negative else None,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS],
        output_type="np",
    ).images


def test_cfg_reproduces_the_diffusers_pipeline(pipe):
    assert np.abs(ours(pipe, mode="cfg", scale=5.0) - diffusers(pipe, negative=True)).max() < TOL


def test_dual_with_s_minus_equal_s_plus_minus_one_is_cfg(pipe):
    cfg = ours(pipe, mode="cfg", scale=5.0)
    assert np.abs(ours(pipe, mode="dual", scale=5.0, negative_scale=4.0) - cfg).max() < TOL
    assert np.abs(ours(pipe, mode="dual", scale=5.0) - cfg).max() < TOL  # s- defaults to s+ - 1


def test_dual_with_s_minus_zero_is_plain_cfg_without_negative(pipe):
    assert np.abs(ours(pipe, mode="dual", scale=5.0, negative_scale=0.0) - diffusers(pipe, negative=False)).max() < TOL


def test_dual_with_other_scales_differs(pipe):
    cfg = ours(pipe, mode="cfg", scale=5.0)
    assert np.abs(ours(pipe, mode="dual", scale=5.0, negative_scale=2.0) - cfg).max() > 1e-3


@pytest.mark.parametrize("mode", ["cfg", "dual"])
def test_delay_zero_is_no_delay_and_delay_one_is_no_negative(pipe, mode):
    plain = ours(pipe, mode=mode, scale=5.0, negative_scale=None if mode == "cfg" else 0.0)
    undelayed = ours(pipe, mode=mode, scale=5.0)
    assert np.abs(ours(pipe, mode=mode, scale=5.0, negative_delay=0.0) - undelayed).max() == 0
    assert np.abs(ours(pipe, mode=mode, scale=5.0, negative_delay=1.0) - diffusers(pipe, negative=False)).max() < TOL
    halfway = ours(pipe, mode=mode, scale=5.0, negative_delay=0.5)
    assert np.abs(halfway - undelayed).max() > 1e-3 and np.abs(halfway - plain).max() > 1e-3


def test_an_image_depends_on_its_seed_not_on_its_batch(pipe):
    both = ours(pipe, mode="cfg", scale=5.0)
    settings = GenerationSettings(num_inference_steps=4, height=64, width=64)
    alone = generate(pipe, PROMPTS[1:], NEGATIVES[1:], SEEDS[1:], settings, output_type="np")
    assert np.abs(alone[0] - both[1]).max() < TOL


def test_which_branches_each_step_runs():
    g = Guidance("dual", 5.0, 2.0, negative_delay=0.5)
    assert [g.branches(i, 4) for i in range(4)] == [("null", "cond")] * 2 + [("null", "cond", "negative")] * 2
    assert Guidance("cfg", 5.0, negative_delay=0.25).branches(0, 4) == ("null", "cond")
    with pytest.raises(ValueError, match="negative_delay"):
        Guidance(negative_delay=1.5)
