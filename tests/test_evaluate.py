"""The evaluate stage: fixed seeds, one embedding pass for both scores, the guide's statistics."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from components.config import EvaluateParams
from components.errors import EaselError
from components.evaluate import run_evaluate, summarize
from components.prompts import NEGATIVE_PRESETS, load_prompt_set
from components.scoring import ImageTextScorer
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


def test_clip_score_matches_an_independent_computation(tiny_models, tmp_path):
    from PIL import Image

    scorer = ImageTextScorer(tiny_params(tiny_models), torch.device("cpu"))
    paths = []
    for i, color in enumerate([(250, 10, 10), (10, 250, 10)]):
        Image.new("RGB", (80, 60), color).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    prompts = ["a red square", "a green square"]
    got = scorer.score(paths, prompts)
    with torch.no_grad():  # by hand: encode separately, normalise, cosine
        for path, prompt, score in zip(paths, prompts, got["clip_score"], strict=True):
            image = scorer.preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
            img = scorer.clip.encode_image(image)
            txt = scorer.clip.encode_text(scorer.tokenizer([prompt]))
            expected = torch.nn.functional.cosine_similarity(img, txt).item()
            assert score == pytest.approx(expected, abs=1e-5)
            assert scorer.aesthetic(img / img.norm(dim=-1, keepdim=True)).item() == pytest.approx(
                got["aesthetic_score"][paths.index(path)], abs=1e-5
            )


def test_evaluate_is_reproducible_and_reports(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt,negative_prompt,category\np1,a cat poster,basic,poster\np2,a cup ad,,ad\n")
    params = EvaluateParams(
        out_dir=str(tmp_path / "eval"),
        prompts=str(prompts),
        seeds=[0, 1],
        height=64,
        width=64,
        num_inference_steps=2,
        batch_size=2,
    )
    models = tiny_params(tiny_models)
    model_dir = tiny_models / "sdxl"
    first = run_evaluate(params, models, model_dir, tmp_path / "m.json", tmp_path / "scores.csv", progress=False)
    scores_a = pd.read_csv(tmp_path / "eval" / "scores.csv")
    run_evaluate(params, models, model_dir, progress=False)
    scores_b = pd.read_csv(tmp_path / "eval" / "scores.csv")
    pd.testing.assert_frame_equal(scores_a, scores_b)  # fixed seeds: the same images, the same scores
    assert first.images == 4 and first.summary["aesthetic"]["count"] == 4
    assert set(first.summary["by_category"]) == {"poster", "ad"}
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["model_fingerprint"] == first.summary["model_fingerprint"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "cosine similarity" in html and html.count("<img") >= 4
    assert sorted(p.name for p in (tmp_path / "eval" / "images").iterdir()) == [
        "p1__seed0.png",
        "p1__seed1.png",
        "p2__seed0.png",
        "p2__seed1.png",
    ]
