"""The evaluate stage: generate (or reuse) images for every model, score them, compare, report.

Each model generates K images per prompt with the same seeds (`torch.Generator("cpu")`),
sampler, steps, size and guidance, so the comparison is paired. Images come from the cache when
(model, prompt, negative prompt, seed, settings) is unchanged. One scorer pass embeds every image
once for both metrics. Outputs in out_dir:
  images/<model>/<prompt>__seed<k>.png   the images (copies from the cache)
  scores.csv                             one row per (model, prompt, seed) with both scores
  summary.json                           per-model tables, comparisons, hashes, definitions
  report.html, report.md                 what a person reads
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from components import report
from components.config import EvaluateParams, ModelsParams, PromoteParams, StorageParams
from components.errors import EaselError
from components.evaluate import models as model_sources
from components.evaluate.cache import ImageCache, image_key
from components.evaluate.stats import AESTHETIC_STATS, score_summary
from components.fsutil import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from components.generation import GenerationSettings, generate
from components.guidance import Guidance
from components.prompts import load_prompt_set, prompt_set_hash
from components.scoring import AESTHETIC_DEFINITION, CLIP_SCORE_DEFINITION, ImageTextScorer

log = logging.getLogger(__name__)


def generation_settings(params: EvaluateParams) -> GenerationSettings:
    g = params.guidance
    return GenerationSettings(
        num_inference_steps=params.num_inference_steps,
        height=params.height,
        width=params.width,
        guidance=Guidance(g.mode, g.scale, g.negative_scale, g.negative_delay),
        sampler=params.sampler,
    )


def generate_for_model(
    model: model_sources.ModelUnderTest,
    prompts: pd.DataFrame,
    params: EvaluateParams,
    cache: ImageCache,
    models: ModelsParams,
    progress: bool,
) -> pd.DataFrame:
    """Every (prompt, seed) image of one model, from the cache or generated into it."""
    settings = generation_settings(params)
    jobs = []
    for prompt in prompts.itertuples():
        for seed in params.seeds:
            key = image_key(model.identity, prompt.prompt, prompt.negative_prompt, seed, settings.key())
            jobs.append(
                {
                    "model": model.name,
                    "prompt_id": prompt.id,
                    "category": prompt.category,
                    "seed": seed,
                    "prompt": prompt.prompt,
                    "negative_prompt": prompt.negative_prompt,
                    "key": key,
                }
            )
    missing = [j for j in jobs if not cache.has(j["key"])]
    log.info("%s: %d images, %d from the cache", model.name, len(jobs), len(jobs) - len(missing))
    if missing:
        from components.models.loaders import default_device, load_sdxl_pipeline

        pipe = load_sdxl_pipeline(model.ref, models if model.name == "base" else None).to(default_device())
        bar = tqdm(total=len(missing), desc=f"generate {model.name}", unit="img", disable=not progress)
        for start in range(0, len(missing), params.batch_size):
            batch = missing[start : start + params.batch_size]
            images = generate(
                pipe,
                [j["prompt"] for j in batch],
                [j["negative_prompt"] for j in batch],
                [j["seed"] for j in batch],
                settings,
            )
            for job, image in zip(batch, images, strict=True):
                cache.put(job["key"], image)
            bar.update(len(batch))
        bar.close()
        del pipe
    return pd.DataFrame(jobs)


def resolve_models(
    params: EvaluateParams,
    models: ModelsParams,
    model_dir: Path,
    storage: StorageParams | None,
    promote: PromoteParams | None,
) -> list[model_sources.ModelUnderTest]:
    chosen = [model_sources.candidate(model_dir)]
    if "production" in params.compare_with:
        if storage is None or promote is None:
            raise EaselError("evaluate: comparing with production needs the storage and promote settings")
        prod = model_sources.production(storage, promote)
        if prod is not None:
            chosen.append(prod)
    if "base" in params.compare_with:
        chosen.append(model_sources.base(models))
    return chosen


@dataclass
class EvaluateSummary:
    images: int
    summary: dict
    report: Path
    scores: Path


def _markdown(summary: dict) -> str:
    rows = []
    for name, table in [("candidate", summary), *summary["models"].items()]:
        a, c = table["aesthetic"], table["clip_score"]
        rows.append([name, *(report.fmt(a[k]) for k in AESTHETIC_STATS), report.fmt(c["mean"]), report.fmt(c["std"])])
    lines = ["## Evaluation", "", report.table_md(["model", *AESTHETIC_STATS, "CLIP mean", "CLIP std"], rows)]
    for name, comp in summary["comparisons"].items():
        lines += [
            "",
            f"**Candidate {name.replace('_', ' ')}** (paired by prompt, {comp['confidence']:.0%} bootstrap CI)",
            "",
        ]
        lines.append(report.comparison_table_md(comp))
    if summary["comparisons"]:
        lines += [
            "",
            "_Detectable at 80% power: the smallest non-inferiority margin that these paired prompts show with "
            "80% power at the CI's one-sided level, given the spread (sd) of the per-prompt differences; a gate "
            "margin below it makes the gate's verdict inconclusive._",
        ]
    lines += ["", f"_{CLIP_SCORE_DEFINITION}. {AESTHETIC_DEFINITION}._", ""]
    return "\n".join(lines)


def _write_report(path: Path, scores: pd.DataFrame, summary: dict, out_dir: Path) -> None:
    from PIL import Image

    model_names = list(dict.fromkeys(scores["model"]))
    hists = report.histograms(
        {f"aesthetic: {m}": scores.loc[scores["model"] == m, "aesthetic_score"].tolist() for m in model_names}
        | {f"CLIP: {m}": scores.loc[scores["model"] == m, "clip_score"].tolist() for m in model_names}
    )
    cats = report.table_html(
        ["category", "images", "aesthetic mean", "CLIP score mean"],
        [
            (k, v["count"], report.fmt(v["aesthetic_mean"]), report.fmt(v["clip_score_mean"]))
            for k, v in summary["by_category"].items()
        ],
    )
    grids = []
    for prompt_id, group in scores.groupby("prompt_id", sort=False):
        rows = []
        for model in model_names:
            cards = [
                report.card(
                    Image.open(out_dir / r.image).convert("RGB"),
                    f"{model}, seed {r.seed}: aesthetic {r.aesthetic_score:.3f}, CLIP {r.clip_score:.3f}",
                )
                for r in group[group["model"] == model].itertuples()
            ]
            rows.append(report.grid(cards))
        grids.append(
            f"<h3>{report.esc(prompt_id)}</h3><p class='note'>{report.esc(group.iloc[0].prompt)}</p>" + "".join(rows)
        )
    import markdown_it

    report.write_html(
        path,
        "Easel evaluation report",
        [
            ("Summary", markdown_it.MarkdownIt().enable("table").render(_markdown(summary))),
            ("Candidate by category", cats),
            ("Distributions", hists),
            ("Images per prompt (rows: " + ", ".join(model_names) + ")", "".join(grids)),
        ],
        intro=f"Guidance: {report.esc(summary['generation']['guidance'])}.",
    )


def run_evaluate(
    params: EvaluateParams,
    models: ModelsParams,
    model_dir: Path,
    metrics_path: Path | None = None,
    plots_path: Path | None = None,
    progress: bool = True,
    storage: StorageParams | None = None,
    promote: PromoteParams | None = None,
) -> EvaluateSummary:
    if not (model_dir / "model_index.json").is_file():
        raise EaselError(f"evaluate: {model_dir} is not a diffusers pipeline folder; run the train stage first")
    prompts = load_prompt_set(params.prompts, params.negative_prompt, params.max_prompts)
    cache = ImageCache(params.cache_dir)
    chosen = resolve_models(params, models, model_dir, storage, promote)
    jobs = pd.concat(
        [generate_for_model(m, prompts, params, cache, models, progress) for m in chosen], ignore_index=True
    )
    scorer = ImageTextScorer(models, batch_size=params.scorer_batch_size, workers=params.scorer_workers)
    metrics = scorer.score([cache.path(k) for k in jobs["key"]], jobs["prompt"].tolist(), progress)
    scores = jobs.assign(**{k: v.astype(float) for k, v in metrics.items()})
    scores["image"] = [
        f"images/{m}/{p}__seed{s}.png"
        for m, p, s in zip(scores["model"], scores["prompt_id"], scores["seed"], strict=True)
    ]
    # The gate reads this file: the summary records its sha256 so that a swapped or edited copy is stale.
    scores_csv = scores.drop(columns=["key"]).to_csv(index=False).encode("utf-8")
    others = [m.name for m in chosen if m.name != "candidate"]
    b = params.bootstrap
    summary = score_summary(scores, others, b.confidence, b.resamples, b.seed) | {
        "model_fingerprint": chosen[0].identity.removeprefix("sha256:"),
        "production_version": next((m.version for m in chosen if m.name == "production"), None),
        "prompt_set_sha256": prompt_set_hash(params.prompts),
        "scores_sha256": hashlib.sha256(scores_csv).hexdigest(),
        "prompts": len(prompts),
        "seeds": list(params.seeds),
        "scorer": scorer.model_name,
        "generation": {
            "guidance": generation_settings(params).guidance.describe(),
            "sampler": params.sampler,
            "steps": params.num_inference_steps,
            "height": params.height,
            "width": params.width,
        },
    }
    out_dir = Path(params.out_dir)
    with atomic_dir(out_dir) as tmp:
        for row in scores.itertuples():
            target = tmp / row.image
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache.path(row.key), target)
        atomic_write_bytes(tmp / "scores.csv", scores_csv)
        atomic_write_json(
            tmp / "summary.json",
            summary
            | {
                "definitions": {"clip_score": CLIP_SCORE_DEFINITION, "aesthetic": AESTHETIC_DEFINITION},
            },
        )
        atomic_write_text(tmp / "report.md", _markdown(summary))
        _write_report(tmp / "report.html", scores, summary, tmp)
    if metrics_path is not None:
        atomic_write_json(metrics_path, summary)
    if plots_path is not None:  # per-image scores for `dvc plots` (outside the stage's out folder)
        columns = ["model", "prompt_id", "category", "seed", "aesthetic_score", "clip_score"]
        atomic_write_text(plots_path, scores[columns].to_csv(index=False))
    return EvaluateSummary(
        int((scores["model"] == "candidate").sum()), summary, out_dir / "report.html", out_dir / "scores.csv"
    )
