"""Evaluate stage: generate from a fixed prompt set with fixed seeds, score, summarise, report.

Each prompt is generated once per seed with `torch.Generator("cpu").manual_seed(seed)`, so the
same (model, prompt, seed, settings) always gives the same image and two models are compared on
the same noise. The summary is the user's guide's table: count, mean, std, min, quartiles, max,
skew and kurtosis of the aesthetic score; mean and std of the CLIP score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch
from tqdm import tqdm

from components import report
from components.config import EvaluateParams, ModelsParams
from components.errors import EaselError
from components.fsutil import atomic_dir, atomic_write_json, atomic_write_text, dir_manifest, manifest_digest
from components.models.loaders import default_device, load_sdxl_pipeline
from components.prompts import load_prompt_set, prompt_set_hash
from components.scoring import AESTHETIC_DEFINITION, CLIP_SCORE_DEFINITION, ImageTextScorer

AESTHETIC_STATS = ("count", "mean", "std", "min", "25%", "50%", "75%", "max", "skew", "kurtosis")


def summarize(scores: pd.DataFrame) -> dict:
    """The guide's per-model table, with its definitions.

    Aesthetic: pandas `describe()` (std with ddof=1), skew and excess kurtosis from scipy with
    bias=True; CLIP score: mean and numpy's std (ddof=0). NaN scores stay NaN (the gate fails
    closed on them).
    """
    aesthetic = scores["aesthetic_score"].astype(float)
    described = aesthetic.describe()
    stats = {name: float(described[name]) for name in AESTHETIC_STATS[:-2]}
    stats["count"] = int(described["count"])
    stats["skew"] = float(scipy.stats.skew(aesthetic, bias=True))
    stats["kurtosis"] = float(scipy.stats.kurtosis(aesthetic, fisher=True, bias=True))
    clip = scores["clip_score"].astype(float).to_numpy()
    return {
        "aesthetic": stats,
        "clip_score": {"mean": float(np.mean(clip)), "std": float(np.std(clip))},
    }


def by_category(scores: pd.DataFrame) -> dict:
    grouped = scores.groupby("category")
    return {
        str(cat): {
            "count": len(group),
            "aesthetic_mean": float(group["aesthetic_score"].mean()),
            "clip_score_mean": float(group["clip_score"].mean()),
        }
        for cat, group in grouped
    }


def model_fingerprint(model_dir: Path) -> str:
    return manifest_digest(dir_manifest(model_dir))


def generate_images(pipe, prompts: pd.DataFrame, params: EvaluateParams, out_dir: Path, progress: bool) -> pd.DataFrame:
    """Generate every (prompt, seed) image into out_dir; one batch per prompt, one generator per seed."""
    rows = []
    bar = tqdm(total=len(prompts) * len(params.seeds), desc="generate", unit="img", disable=not progress)
    for prompt in prompts.itertuples():
        for start in range(0, len(params.seeds), params.batch_size):
            seeds = params.seeds[start : start + params.batch_size]
            images = pipe(
                prompt=[prompt.prompt] * len(seeds),
                negative_prompt=[prompt.negative_prompt] * len(seeds),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                height=params.height,
                width=params.width,
            ).images
            for seed, image in zip(seeds, images, strict=True):
                name = f"{prompt.id}__seed{seed}.png"
                image.save(out_dir / name)
                rows.append(
                    {
                        "prompt_id": prompt.id,
                        "category": prompt.category,
                        "seed": seed,
                        "prompt": prompt.prompt,
                        "image": f"images/{name}",
                    }
                )
            bar.update(len(seeds))
    bar.close()
    return pd.DataFrame(rows)


@dataclass
class EvaluateSummary:
    images: int
    summary: dict
    report: Path
    scores: Path


def _write_report(path: Path, scores: pd.DataFrame, summary: dict, out_dir: Path, title_note: str) -> Path:
    from PIL import Image

    a, c = summary["aesthetic"], summary["clip_score"]
    table = report.table_html(
        ["statistic", *AESTHETIC_STATS, "CLIP mean", "CLIP std"],
        [
            [
                "aesthetic score",
                *(report.fmt(a[k]) for k in AESTHETIC_STATS),
                report.fmt(c["mean"]),
                report.fmt(c["std"]),
            ]
        ],
    )
    cats = report.table_html(
        ["category", "images", "aesthetic mean", "CLIP score mean"],
        [
            (k, v["count"], report.fmt(v["aesthetic_mean"]), report.fmt(v["clip_score_mean"]))
            for k, v in summary["by_category"].items()
        ],
    )
    hists = report.histograms(
        {"aesthetic score": scores["aesthetic_score"].tolist(), "CLIP score": scores["clip_score"].tolist()}
    )
    grids = []
    for prompt_id, group in scores.groupby("prompt_id", sort=False):
        cards = [
            report.card(
                Image.open(out_dir / r.image).convert("RGB"),
                f"seed {r.seed}: aesthetic {r.aesthetic_score:.3f}, CLIP {r.clip_score:.3f}",
            )
            for r in group.itertuples()
        ]
        grids.append(
            f"<h3>{report.esc(prompt_id)}</h3><p class='note'>{report.esc(group.iloc[0].prompt)}</p>"
            + report.grid(cards)
        )
    return report.write_html(
        path,
        "Easel evaluation report",
        [("Summary", table + cats), ("Distributions", hists), ("Images per prompt", "".join(grids))],
        intro=f"{report.esc(title_note)}<br>{report.esc(CLIP_SCORE_DEFINITION)}.<br>{report.esc(AESTHETIC_DEFINITION)}.",
    )


def run_evaluate(
    params: EvaluateParams,
    models: ModelsParams,
    model_dir: Path,
    metrics_path: Path | None = None,
    plots_path: Path | None = None,
    progress: bool = True,
) -> EvaluateSummary:
    if not (model_dir / "model_index.json").is_file():
        raise EaselError(f"evaluate: {model_dir} is not a diffusers pipeline folder; run the train stage first")
    prompts = load_prompt_set(params.prompts, params.negative_prompt)
    out_dir = Path(params.out_dir)
    device = default_device()
    pipe = load_sdxl_pipeline(str(model_dir)).to(device)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        scores = generate_images(pipe, prompts, params, tmp / "images", progress)
        del pipe
        scorer = ImageTextScorer(models, device)
        metrics = scorer.score([tmp / p for p in scores["image"]], scores["prompt"].tolist(), progress)
        scores = scores.assign(**{k: v.astype(float) for k, v in metrics.items()})
        scores.to_csv(tmp / "scores.csv", index=False)
        summary = summarize(scores) | {
            "by_category": by_category(scores),
            "model_fingerprint": model_fingerprint(model_dir),
            "prompt_set_sha256": prompt_set_hash(params.prompts),
            "prompts": len(prompts),
            "seeds": list(params.seeds),
            "scorer": scorer.model_name,
        }
        atomic_write_json(
            tmp / "summary.json",
            summary
            | {
                "definitions": {"clip_score": CLIP_SCORE_DEFINITION, "aesthetic": AESTHETIC_DEFINITION},
                "generation": params.model_dump(include={"guidance_scale", "num_inference_steps", "height", "width"}),
            },
        )
        _write_report(
            tmp / "report.html",
            scores,
            summary,
            tmp,
            f"Model {model_dir} ({summary['model_fingerprint'][:12]})",
        )
    if metrics_path is not None:
        atomic_write_json(metrics_path, summary)
    if plots_path is not None:  # per-image scores for `dvc plots` (outside the stage's out folder)
        atomic_write_text(plots_path, scores.drop(columns=["prompt"]).to_csv(index=False))
    return EvaluateSummary(len(scores), summary, out_dir / "report.html", out_dir / "scores.csv")


def read_summary(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EaselError(f"{path}: evaluation summary not found; run the evaluate stage first") from None
    except json.JSONDecodeError as exc:
        raise EaselError(f"{path}: evaluation summary is not valid JSON: {exc}") from None
