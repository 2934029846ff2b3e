"""The evaluate stage: fixed seeds, one embedding pass for both scores, the guide's statistics,
paired comparisons with a bootstrap CI, cached images."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from components.config import PromoteParams, StorageParams
from components.evaluate import run_evaluate
from components.evaluate.stats import bootstrap_mean_ci, paired_comparison, summarize
from components.plumbing.errors import EaselError
from components.prompts import NEGATIVE_PRESETS, load_prompt_set
from components.scoring import ImageTextScorer
from tests.helpers import put_in_production, tiny_evaluate_params
from tests.test_models import tiny_params


def test_summary_statistics_match_pandas_and_scipy():
    values = [5.1, 6.3, 6.0, 7.2, 5.5, 6.6, 6.1]
    clip = [0.21, 0.25, 0.30, 0.28, 0.22, 0.27, 0.26]
    stats = summarize(pd.DataFrame({"aesthetic_score": values, "clip_score": clip}))
    a = stats["aesthetic"]
    assert a["count"] == 7
    assert a["mean"] == pytest.approx(np.mean(values))
    assert a["std"] == pytest.approx(np.std(values, ddof=1))  # pandas describe()
    assert (a["min"], a["max"]) == (5.1, 7.2)
    assert a["25%"] == pytest.approx(np.percentile(values, 25))
    assert a["50%"] == pytest.approx(6.1)
    assert a["skew"] == pytest.approx(scipy.stats.skew(values, bias=True))
    assert a["kurtosis"] == pytest.approx(scipy.stats.kurtosis(values, fisher=True, bias=True))
    assert stats["clip_score"]["std"] == pytest.approx(np.std(clip))  # ddof=0, as the guide's np.std


def test_bootstrap_ci_covers_a_known_difference():
    rng = np.random.default_rng(1)
    true_difference = 0.05  # aesthetic points, with a per-prompt std of 0.2: the reference's example
    covered = 0
    trials = 60
    for trial in range(trials):
        diffs = true_difference + rng.normal(0, 0.2, 100)
        low, high = bootstrap_mean_ci(diffs, 0.95, 2000, seed=trial)
        covered += low <= true_difference <= high
        assert low < diffs.mean() < high
    assert 0.85 <= covered / trials <= 1.0  # nominal 95 %
    assert bootstrap_mean_ci(np.full(10, 0.3), 0.95, 1000, 0) == pytest.approx((0.3, 0.3))  # no spread


def test_paired_comparison_pairs_by_prompt_and_averages_seeds():
    rows = []
    for prompt, (cand, other) in {"p1": (6.0, 5.0), "p2": (6.5, 6.0), "p3": (5.0, 5.5)}.items():
        for seed, noise in ((0, -0.1), (1, 0.1)):
            rows.append(
                {
                    "model": "candidate",
                    "prompt_id": prompt,
                    "seed": seed,
                    "aesthetic_score": cand + noise,
                    "clip_score": 0.3,
                }
            )
            rows.append(
                {
                    "model": "production",
                    "prompt_id": prompt,
                    "seed": seed,
                    "aesthetic_score": other + noise,
                    "clip_score": 0.3,
                }
            )
    result = paired_comparison(pd.DataFrame(rows), "candidate", "production", 0.95, 2000, 0)
    assert result["aesthetic"]["mean_diff"] == pytest.approx((1.0 + 0.5 - 0.5) / 3)
    assert result["aesthetic"]["win_rate"] == pytest.approx(2 / 3)
    assert result["clip_score"]["win_rate"] == 0.5 and result["clip_score"]["mean_diff"] == 0  # ties
    assert result["aesthetic"]["prompts"] == 3


def test_prompt_set_presets_and_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,negative_prompt,category\na,cat poster,basic,poster\nb,dog ad,,ad\nc,bird,blurry,\n")
    table = load_prompt_set(path, default_negative="non_adult")
    assert table["negative_prompt"].tolist() == [NEGATIVE_PRESETS["basic"], NEGATIVE_PRESETS["non_adult"], "blurry"]
    assert table["category"].tolist() == ["poster", "ad", "all"]
    path.write_text("id,prompt\na,x\na,y\n")
    with pytest.raises(EaselError, match="repeated: a"):
        load_prompt_set(path)
    path.write_text("id,prompt\n../etc,x\n")
    with pytest.raises(EaselError, match="prompt ids may use"):
        load_prompt_set(path)
    path.write_text("name,text\na,x\n")
    with pytest.raises(EaselError, match="missing column"):
        load_prompt_set(path)


def test_the_default_prompt_set_and_its_quick_subset():
    from tests.conftest import REPO

    full = load_prompt_set(REPO / "data/prompts/eval_prompts.csv")
    assert len(full) >= 64 and set(full["category"]) == {"poster", "ad", "product"}
    guide = full.set_index("id").loc[["pet-bag", "skincare"]]
    assert guide["prompt"].str.startswith(("A feline peering", "Four amber glass bottles")).all()
    assert set(guide["category"]) == {"product"}
    quick = load_prompt_set(REPO / "data/prompts/eval_prompts.csv", max_prompts=6)
    # the categories take turns, each in file order; the subset keeps the file's order
    assert quick["id"].tolist() == ["pet-bag", "skincare", "coffee-poster", "movie-poster", "travel-ad", "car-ad"]
    assert quick["category"].value_counts().to_dict() == {"product": 2, "poster": 2, "ad": 2}


def open_clip_to_hf(clip, config: dict):
    """The same weights in transformers' CLIPModel: an independent implementation of CLIP."""
    from transformers import CLIPConfig, CLIPModel

    model_cfg = config["model_cfg"]
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    hf = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": text["vocab_size"],
                "hidden_size": text["width"],
                "intermediate_size": 4 * text["width"],
                "num_hidden_layers": text["layers"],
                "num_attention_heads": text["heads"],
                "max_position_embeddings": text["context_length"],
                "hidden_act": "quick_gelu",
                "eos_token_id": 49407,
                "projection_dim": model_cfg["embed_dim"],
            },
            vision_config={
                "hidden_size": vision["width"],
                "intermediate_size": 4 * vision["width"],
                "num_hidden_layers": vision["layers"],
                "num_attention_heads": vision["width"] // vision["head_width"],
                "image_size": vision["image_size"],
                "patch_size": vision["patch_size"],
                "hidden_act": "quick_gelu",
                "projection_dim": model_cfg["embed_dim"],
            },
            projection_dim=model_cfg["embed_dim"],
        )
    ).eval()
    src = clip.state_dict()
    out = {"logit_scale": src["logit_scale"]}

    def blocks(prefix: str, target: str, layers: int) -> None:
        for i in range(layers):
            s, t = f"{prefix}.resblocks.{i}", f"{target}.encoder.layers.{i}"
            q, k, v = src[f"{s}.attn.in_proj_weight"].chunk(3)
            qb, kb, vb = src[f"{s}.attn.in_proj_bias"].chunk(3)
            out.update(
                {
                    f"{t}.self_attn.q_proj.weight": q,
                    f"{t}.self_attn.k_proj.weight": k,
                    f"{t}.self_attn.v_proj.weight": v,
                    f"{t}.self_attn.q_proj.bias": qb,
                    f"{t}.self_attn.k_proj.bias": kb,
                    f"{t}.self_attn.v_proj.bias": vb,
                }
            )
            for a, b in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{t}.{b}.weight"], out[f"{t}.{b}.bias"] = src[f"{s}.{a}.weight"], src[f"{s}.{a}.bias"]

    blocks("visual.transformer", "vision_model", vision["layers"])
    blocks("transformer", "text_model", text["layers"])
    out.update(
        {
            "vision_model.embeddings.patch_embedding.weight": src["visual.conv1.weight"],
            "vision_model.embeddings.class_embedding": src["visual.class_embedding"],
            "vision_model.embeddings.position_embedding.weight": src["visual.positional_embedding"],
            "vision_model.pre_layrnorm.weight": src["visual.ln_pre.weight"],
            "vision_model.pre_layrnorm.bias": src["visual.ln_pre.bias"],
            "vision_model.post_layernorm.weight": src["visual.ln_post.weight"],
            "vision_model.post_layernorm.bias": src["visual.ln_post.bias"],
            "visual_projection.weight": src["visual.proj"].T,
            "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
            "text_model.final_layer_norm.weight": src["ln_final.weight"],
            "text_model.final_layer_norm.bias": src["ln_final.bias"],
            "text_projection.weight": src["text_projection"].T,
        }
    )
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return hf


def test_clip_score_matches_transformers_clipmodel(tiny_models, tmp_path):
    from PIL import Image

    scorer = ImageTextScorer(tiny_params(tiny_models), torch.device("cpu"), workers=0)
    hf = open_clip_to_hf(scorer.clip, json.loads((tiny_models / "open_clip" / "open_clip_config.json").read_text()))
    paths, prompts = [], ["a red square on a poster", "a green square, product photo, " + "very long " * 40]
    for i, color in enumerate([(250, 10, 10), (10, 250, 10)]):
        Image.new("RGB", (80, 60), color).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    ours = scorer.score(paths, prompts)["clip_score"]
    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(Image.open(p).convert("RGB")) for p in paths])
        ids = scorer.tokenizer(prompts)  # 77 tokens, the long prompt truncated
        image = hf.get_image_features(pixel_values=pixels)
        text = hf.get_text_features(input_ids=ids)
        image, text = (x.pooler_output if hasattr(x, "pooler_output") else x for x in (image, text))
        reference = torch.nn.functional.cosine_similarity(image, text).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # torchmetrics' CLIPScore would report 100 * max(cos, 0): the same number on another scale.
    assert np.allclose(100 * np.maximum(ours, 0), 100 * np.maximum(reference, 0), atol=1e-3)


def test_one_embedding_pass_serves_both_scores(tiny_models, tmp_path, monkeypatch):
    from PIL import Image

    scorer = ImageTextScorer(tiny_params(tiny_models), torch.device("cpu"), workers=0)
    calls = []
    original = scorer.clip.encode_image
    monkeypatch.setattr(scorer.clip, "encode_image", lambda x: calls.append(len(x)) or original(x))
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    scorer.score([tmp_path / f"{i}.png" for i in range(5)], ["p"] * 5)
    assert sum(calls) == 5  # each image encoded once, not once per metric


def write_prompts(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "id,prompt,negative_prompt,category\np1,a cat poster,basic,poster\np2,a cup ad,,ad\n"
        "p3,a rocket poster,non_adult,poster\n"
    )
    return prompts


def test_evaluate_against_base_is_reproducible_and_reports(tmp_path, tiny_models):
    params = tiny_evaluate_params(tmp_path, write_prompts(tmp_path), compare_with=["base"])
    models = tiny_params(tiny_models)
    first = run_evaluate(
        params, models, tiny_models / "sdxl", tmp_path / "m.json", tmp_path / "plot.csv", progress=False
    )
    scores_a = pd.read_csv(tmp_path / "eval" / "scores.csv")
    run_evaluate(
        params.model_copy(update={"cache_dir": str(tmp_path / "fresh-cache")}),
        models,
        tiny_models / "sdxl",
        progress=False,
    )
    scores_b = pd.read_csv(tmp_path / "eval" / "scores.csv")
    pd.testing.assert_frame_equal(scores_a, scores_b)  # regenerated from scratch: the same images and scores
    assert first.images == 6 and set(scores_a["model"]) == {"candidate", "base"}
    vs_base = first.summary["comparisons"]["vs_base"]["aesthetic"]
    assert vs_base["mean_diff"] == 0 and vs_base["win_rate"] == 0.5  # the same weights: no difference
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["model_fingerprint"] == first.summary["model_fingerprint"]
    from components.plumbing.fsutil import sha256_file

    written = json.loads((tmp_path / "eval" / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert written["scores_sha256"] == sha256_file(tmp_path / "eval" / "scores.csv")  # bound to the gate's input
    assert written["comparisons"]["vs_base"]["aesthetic"]["mde_80"] is None  # no spread: nothing to plan with
    assert set(metrics["by_category"]) == {"poster", "ad"}
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "cosine similarity" in html and html.count("<img") >= 12
    assert "Candidate vs base" in (tmp_path / "eval" / "report.md").read_text()


def test_an_evaluate_shard_reads_only_the_models_it_generates_with(tmp_path, tiny_models, monkeypatch):
    """Two models on two shards: each shard fingerprints the folder of its own model only (a
    fingerprint reads every file: about 7 GB for SDXL), and after both shards the stage generates
    nothing and scores what a single process scores. The fingerprint is wrapped to see which
    folders it reads, and still computes."""
    import shutil

    from safetensors.torch import load_file, save_file

    import components.evaluate.models as model_sources
    from components.evaluate.stage import generate_shard

    candidate = shutil.copytree(tiny_models / "sdxl", tmp_path / "candidate")
    weights = candidate / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)  # "trained": another model
    params = tiny_evaluate_params(tmp_path, write_prompts(tmp_path), compare_with=["base"])
    models = tiny_params(tiny_models)
    fingerprint, read = model_sources.model_fingerprint, []
    monkeypatch.setattr(model_sources, "model_fingerprint", lambda folder: read.append(folder) or fingerprint(folder))
    for k, own in enumerate([candidate, tiny_models / "sdxl"]):
        read.clear()
        assert generate_shard(params, models, candidate, (k, 2), progress=False) == (6, 6)  # 3 prompts x 2 seeds
        assert [Path(folder).resolve() for folder in read] == [own.resolve()]

    cached = sorted((tmp_path / "cache").rglob("*"))
    run_evaluate(params, models, candidate, progress=False)
    assert sorted((tmp_path / "cache").rglob("*")) == cached  # nothing generated again
    sharded = pd.read_csv(tmp_path / "eval" / "scores.csv")
    single = params.model_copy(update={"cache_dir": str(tmp_path / "single-cache"), "out_dir": str(tmp_path / "one")})
    run_evaluate(single, models, candidate, progress=False)
    pd.testing.assert_frame_equal(sharded, pd.read_csv(tmp_path / "one" / "scores.csv"))


def test_production_comes_from_the_registry_and_its_images_are_cached(tmp_path, tiny_models, s3_server, monkeypatch):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # the registry download cache is project-relative
    _, version = put_in_production(s3_server.settings(), "evalprod", tiny_models / "sdxl")
    storage = StorageParams(bucket="evalprod", embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)})
    promote = PromoteParams(model_name="posters")
    params = tiny_evaluate_params(tmp_path, write_prompts(tmp_path), compare_with=["production", "base"])
    result = run_evaluate(
        params, tiny_params(tiny_models), tiny_models / "sdxl", progress=False, storage=storage, promote=promote
    )
    assert result.summary["production_version"] == version
    assert set(result.summary["comparisons"]) == {"vs_production", "vs_base"}
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.png")}
    assert len(cached) == 6  # candidate, production and base are the same weights: one set of images
    run_evaluate(
        params, tiny_params(tiny_models), tiny_models / "sdxl", progress=False, storage=storage, promote=promote
    )
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.png")} == cached  # nothing regenerated
