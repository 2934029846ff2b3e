"""A real rejection, end to end: generate -> score -> compare -> gate, rejected by non-inferiority.

The candidate is the production model with its U-Net damaged on purpose (every weight perturbed
by noise of twice its tensor's spread). The scorer is the pipeline's own (open_clip image
embeddings + the LAION-style linear MLP, loaded through the same code), but its direction is
known: like the LAION predictor, which is a linear regression on CLIP embeddings against
ratings, its weights are fitted on held-out generations, production's rated 6.8 and the damaged
model's 6.2, from prompts and seeds that the evaluation does not use. The gate's thresholds are
the sdxl profile's (floors 6.0 / 5.0, margins 0.05 / 0.01), except the CLIP floor, which a
random tiny CLIP cannot reach. The damaged candidate clears every floor; non-inferiority
rejects it. The control, an undamaged copy, is not rejected.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.config import ModelsParams, PromoteParams, StorageParams
from components.evaluate import run_evaluate
from components.models.aesthetic import AestheticMLP
from components.models.loaders import load_sdxl_pipeline
from components.release.promote import run_gate
from components.scoring import ImageTextScorer
from components.sdxl.generation import GenerationSettings, generate
from tests.helpers import put_in_production, sdxl_gate_params, tiny_evaluate_params, write_prompts

pytestmark = pytest.mark.slow

# the sdxl profile's gate, but a CLIP floor that a random tiny CLIP can meet
GATE = sdxl_gate_params(min_clip_score_mean=-1.0, max_share_below_floor=0.1)


def damage_unet(model_dir, scale: float = 2.0, seed: int = 0) -> None:
    """Add noise of `scale` x each tensor's std to every U-Net weight, in place (safetensors)."""
    path = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    damaged = {}
    for name, tensor in state.items():
        spread = tensor.float().std() if tensor.numel() > 1 else tensor.float().abs().mean()
        noise = torch.randn(tensor.shape, generator=generator) * (scale * float(spread) + 1e-3)
        damaged[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(damaged, str(path))


def fitted_aesthetic(scorer: ImageTextScorer, good: list, poor: list, out_path, ratings=(6.8, 6.2)) -> None:
    """A LAION-architecture MLP whose linear map is the ridge fit of ratings on the images' embeddings."""
    embeddings = scorer.embed_images(good + poor).double().numpy()
    ratings_vec = np.array([ratings[0]] * len(good) + [ratings[1]] * len(poor))
    mean_x, mean_y = embeddings.mean(0), ratings_vec.mean()
    centered = embeddings - mean_x
    weights = np.linalg.solve(
        centered.T @ centered + 1e-3 * np.eye(centered.shape[1]), centered.T @ (ratings_vec - mean_y)
    )
    bias = mean_y - mean_x @ weights
    mlp = AestheticMLP(embeddings.shape[1])
    with torch.no_grad():
        for layer in mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0] = 1.0  # pass the first unit through every later layer
        mlp.layers[0].weight[0] = torch.tensor(weights, dtype=torch.float32)
        mlp.layers[7].bias[0] = float(bias)
    save_file(mlp.state_dict(), str(out_path))


def images_of(model_dir, prompts: list[str], seeds: list[int], out_dir) -> list:
    out_dir.mkdir(parents=True)
    pipe = load_sdxl_pipeline(str(model_dir))
    settings = GenerationSettings(num_inference_steps=4, height=64, width=64)
    paths = []
    for seed in seeds:
        for i, image in enumerate(generate(pipe, prompts, [""] * len(prompts), [seed] * len(prompts), settings)):
            paths.append(out_dir / f"{seed}-{i}.png")
            image.save(paths[-1])
    return paths


def test_a_damaged_candidate_is_rejected_by_non_inferiority(tmp_path, tiny_models, s3_server, monkeypatch):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # the registry's download cache lives under .easel/
    production = shutil.copytree(tiny_models / "sdxl", tmp_path / "production")
    damaged = shutil.copytree(tiny_models / "sdxl", tmp_path / "damaged")
    damage_unet(damaged)
    control = shutil.copytree(tiny_models / "sdxl", tmp_path / "control")  # the same weights as production,
    (control / "notes.txt").write_text("a copy")  # in a folder that is not production's model (another fingerprint)

    # The scorer: fitted on 24 held-out prompts x 2 seeds the evaluation never sees.
    held_out = [f"a held-out poster of object {i}" for i in range(24)]
    models = ModelsParams(
        sdxl=str(production),
        clip_model=f"local-dir:{tiny_models / 'open_clip'}",
        aesthetic=str(tiny_models / "aesthetic/aesthetic_mlp.safetensors"),
    )
    scorer = ImageTextScorer(models, workers=0)
    fitted = tmp_path / "fitted_aesthetic.safetensors"
    fitted_aesthetic(
        scorer,
        images_of(production, held_out, [100, 101], tmp_path / "fit" / "good"),
        images_of(damaged, held_out, [100, 101], tmp_path / "fit" / "poor"),
        fitted,
    )
    models = models.model_copy(update={"aesthetic": str(fitted)})

    # Production in the registry, as a promote would have left it.
    storage = StorageParams(
        bucket="reject-" + os.urandom(3).hex(), embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)}
    )
    promote = PromoteParams(out_dir=str(tmp_path / "promote"), model_name="posters")
    registry, version = put_in_production(s3_server.settings(), storage.bucket, production)

    prompts = write_prompts(tmp_path / "prompts.csv", 12)
    evaluate = tiny_evaluate_params(
        tmp_path, prompts, num_inference_steps=4, compare_with=["production"], bootstrap={"resamples": 2000}
    )

    def evaluate_and_gate(candidate):
        result = run_evaluate(evaluate, models, candidate, progress=False, storage=storage, promote=promote)
        decision = run_gate(GATE, promote, storage, evaluate, candidate, out_dir=tmp_path / "gate")
        return result.summary, {r["rule"]: r for r in decision["rules"]}, decision

    summary, rules, decision = evaluate_and_gate(damaged)
    ev = decision["evidence"]["aesthetic"]
    assert summary["production_version"] == version and decision["reference"] == "production"
    assert summary["comparisons"]["vs_production"]["aesthetic"]["ci_high"] < -GATE.margins.aesthetic
    assert decision["verdict"] == "reject"
    for rule in (
        "aesthetic_mean",
        "clip_score_mean",
        "share_below_aesthetic_5",
        "evaluated_this_model",
        "evaluated_against_current_production",
        "scores_complete",
        "summary_matches_scores",
    ):
        assert rules[rule]["status"] == "pass", rules[rule]  # not a floor, not a stale or broken input
    rejected_by = rules["non_inferiority_aesthetic_vs_production"]
    assert rejected_by["status"] == "fail" and "candidate worse" in rejected_by["note"], (rejected_by, ev)
    assert registry.alias("posters", "production")["version"] == version

    # The control: the same scorer and gate on an undamaged copy do not reject on aesthetics.
    _, rules, decision = evaluate_and_gate(control)
    assert rules["non_inferiority_aesthetic_vs_production"]["status"] != "fail", rules
    assert rules["aesthetic_mean"]["status"] == "pass"

    # Production's own model: nothing to compare, it is "unchanged" and passes, whatever the scores say.
    decision = run_gate(GATE, promote, storage, evaluate, production, out_dir=tmp_path / "gate")
    assert decision["verdict"] == "unchanged" and decision["inputs"]["production_version"] == version
