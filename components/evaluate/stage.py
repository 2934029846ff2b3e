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
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from components import report
from components.config import EVALUATE_ROLES, EvaluateParams, ModelsParams, PromoteParams, StorageParams
from components.evaluate import leaderboard
from components.evaluate import models as model_sources
from components.evaluate.cache import ImageCache, image_key
from components.evaluate.stats import AESTHETIC_STATS, score_summary, summarize
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from components.prompts import load_prompt_set, prompt_set_hash
from components.scoring import AESTHETIC_DEFINITION, CLIP_SCORE_DEFINITION, ImageTextScorer
from components.sdxl.generation import GenerationSettings, generate
from components.sdxl.guidance import Guidance
from components.sharding import Shard, batches, contiguous_share

log = logging.getLogger(__name__)


def generation_settings(params: EvaluateParams, models: ModelsParams) -> GenerationSettings:
    g = params.guidance
    return GenerationSettings(
        num_inference_steps=params.num_inference_steps,
        height=params.height,
        width=params.width,
        guidance=Guidance(g.mode, g.scale, g.negative_scale, g.negative_delay),
        sampler=params.sampler,
        max_token_length=models.max_token_length,  # the prompt encoding training used
        long_prompt_mode=models.long_prompt_mode,
    )


def plan_images(
    model: model_sources.ModelUnderTest, prompts: pd.DataFrame, params: EvaluateParams, models: ModelsParams
) -> list[dict]:
    """Every (prompt, seed) image of one model, with its cache key."""
    settings_key = generation_settings(params, models).key()
    return [
        {
            "model": model.name,
            "prompt_id": prompt.id,
            "category": prompt.category,
            "seed": seed,
            "prompt": prompt.prompt,
            "negative_prompt": prompt.negative_prompt,
            "key": image_key(model.identity, prompt.prompt, prompt.negative_prompt, seed, settings_key),
        }
        for prompt in prompts.itertuples()
        for seed in params.seeds
    ]


def generate_for_model(
    model: model_sources.ModelUnderTest,
    prompts: pd.DataFrame,
    params: EvaluateParams,
    models: ModelsParams,
    cache: ImageCache,
    progress: bool,
) -> tuple[pd.DataFrame, int]:
    """Every (prompt, seed) image of one model, from the cache or generated into it; and how many
    were generated now."""
    jobs = plan_images(model, prompts, params, models)
    todo = batches([j for j in jobs if not cache.has(j["key"])], params.batch_size)
    log.info("%s: %d images, %d to generate", model.name, len(jobs), sum(map(len, todo)))
    return pd.DataFrame(jobs), generate_batches(model, todo, params, models, cache, progress)


def generate_batches(
    model: model_sources.ModelUnderTest,
    todo: list[list[dict]],
    params: EvaluateParams,
    models: ModelsParams,
    cache: ImageCache,
    progress: bool,
) -> int:
    """Generate the batches `todo` of one model's jobs into the cache (the model is loaded only if
    there is one); how many images that was."""
    settings = generation_settings(params, models)
    count = sum(map(len, todo))
    if todo:
        from components.models.loaders import default_device, load_sdxl_pipeline

        pipe = load_sdxl_pipeline(model.ref, model.load_with).to(default_device())
        bar = tqdm(total=count, desc=f"generate {model.name}", unit="img", disable=not progress)
        for batch in todo:
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
    return count


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


def _leaderboard_md(ranking: pd.DataFrame, in_run: dict[str, list[str]], board_path: str, others: int) -> str:
    """The leaderboard rows comparable with this run, best mean aesthetic first."""
    headers = ["#", "Model", "in this run", *AESTHETIC_STATS, "CLIP mean", "CLIP std", "fingerprint", "scored at"]
    rows = []
    for rank, r in enumerate(ranking.to_dict("records"), start=1):
        stats = [report.fmt(_cell(r[f"{stat}_LAIONScore"])) for stat in AESTHETIC_STATS]
        fingerprint = str(r["model_fingerprint"]).removeprefix("sha256:")[:12]
        now = ", ".join(in_run.get(r["model_fingerprint"], [])) or "-"
        clip = [report.fmt(_cell(r["Clipscore_mean"])), report.fmt(_cell(r["Clipscore_std"]))]
        rows.append([rank, r["Model"], now, *stats, *clip, fingerprint, r["scored_at"]])
    lines = [
        "## Leaderboard",
        "",
        f"Every model scored on this prompt set with these seeds, settings and scorer (`{board_path}`; the guide's "
        "MyModelSummary_Total.csv). A model already on it is not generated or scored again.",
        "",
        report.table_md(headers, rows),
    ]
    if others:
        lines += ["", f"_{others} more row(s) in the file were scored on another prompt set or protocol: not shown._"]
    return "\n".join(lines)


def _cell(value: object) -> object:
    """A leaderboard cell for report.fmt: numbers as floats (pandas' NA as NaN)."""
    return float("nan") if pd.isna(value) else float(value)


def _markdown(summary: dict, leaderboard_md: str = "") -> str:
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
    if leaderboard_md:
        lines += ["", leaderboard_md]
    lines += ["", f"_{CLIP_SCORE_DEFINITION}. {AESTHETIC_DEFINITION}._", ""]
    return "\n".join(lines)


def _card(image_path: Path | None, r) -> str:
    from PIL import Image

    label = f"{r.model}, seed {r.seed}"
    if image_path is None:
        return report.card(None, f"{label}: not in the image cache")
    if pd.isna(r.aesthetic_score):
        return report.card(Image.open(image_path).convert("RGB"), f"{label}: scored in an earlier run (leaderboard)")
    caption = f"{label}: aesthetic {r.aesthetic_score:.3f}, CLIP {r.clip_score:.3f}"
    return report.card(Image.open(image_path).convert("RGB"), caption)


def _write_report(
    path: Path, scores: pd.DataFrame, gallery: pd.DataFrame, summary: dict, md: str, out_dir: Path
) -> None:
    """The HTML report; `gallery` holds every model's images (scored now or earlier), one grid per prompt."""
    scored = list(dict.fromkeys(scores["model"]))
    hists = report.histograms(
        {f"aesthetic: {m}": scores.loc[scores["model"] == m, "aesthetic_score"].tolist() for m in scored}
        | {f"CLIP: {m}": scores.loc[scores["model"] == m, "clip_score"].tolist() for m in scored}
    )
    cats = report.table_html(
        ["category", "images", "aesthetic mean", "CLIP score mean"],
        [
            (k, v["count"], report.fmt(v["aesthetic_mean"]), report.fmt(v["clip_score_mean"]))
            for k, v in summary["by_category"].items()
        ],
    )
    model_names = list(dict.fromkeys(gallery["model"]))
    grids = []
    for prompt_id, group in gallery.groupby("prompt_id", sort=False):
        rows = []
        for model in model_names:
            mine = group[group["model"] == model].itertuples()
            rows.append(report.grid(_card(out_dir / r.image if isinstance(r.image, str) else None, r) for r in mine))
        grids.append(
            f"<h3>{report.esc(prompt_id)}</h3><p class='note'>{report.esc(group.iloc[0].prompt)}</p>" + "".join(rows)
        )
    import markdown_it

    report.write_html(
        path,
        "Easel evaluation report",
        [
            ("Summary", markdown_it.MarkdownIt().enable("table").render(md)),
            ("Candidate by category", cats),
            ("Distributions", hists),
            ("Images per prompt (rows: " + ", ".join(model_names) + ")", "".join(grids)),
        ],
        intro=f"Guidance: {report.esc(summary['generation']['guidance'])}.",
    )


def scorer_identity(models: ModelsParams) -> str:
    """The scorer's models, as named in params: part of the leaderboard's protocol."""
    return json.dumps([models.clip_model, models.clip_pretrained, models.aesthetic, models.aesthetic_sha256])


def _role(model: model_sources.ModelUnderTest) -> str:
    return model.name if model.name in EVALUATE_ROLES else "panel"


def _board_name(model: model_sources.ModelUnderTest) -> str:
    """A leaderboard row's Model: the candidate and production change from run to run, so they carry their id."""
    if model.name == "candidate":
        return f"candidate-{model.identity.removeprefix('sha256:')[:12]}"
    if model.name == "production" and model.version:
        return f"production-{model.version}"
    return model.name


@dataclass
class EvaluationPlan:
    """What an evaluation generates and scores, settled before anything is generated."""

    prompts: pd.DataFrame
    chosen: list[model_sources.ModelUnderTest]  # the candidate, then production and base as asked
    panel: list[model_sources.ModelUnderTest]
    earlier: list[model_sources.ModelUnderTest]  # panel models already on the leaderboard: not scored again
    prompt_sha: str
    protocol: str
    board: pd.DataFrame

    @property
    def scored(self) -> list[model_sources.ModelUnderTest]:
        return [*self.chosen, *(m for m in self.panel if m not in self.earlier)]


def plan_evaluation(
    params: EvaluateParams,
    models: ModelsParams,
    model_dir: Path,
    storage: StorageParams | None,
    promote: PromoteParams | None,
) -> EvaluationPlan:
    if not (model_dir / "model_index.json").is_file():
        raise EaselError(f"evaluate: {model_dir} is not a diffusers pipeline folder; run the train stage first")
    prompts = load_prompt_set(params.prompts, params.negative_prompt, params.max_prompts)
    chosen = resolve_models(params, models, model_dir, storage, promote)
    # Every panel reference and the leaderboard are checked before anything is generated.
    panel = [model_sources.panel_model(entry, i, models, storage) for i, entry in enumerate(params.panel)]
    prompt_sha = prompt_set_hash(params.prompts)
    protocol = leaderboard.protocol_hash(
        prompts, params.seeds, generation_settings(params, models).key(), scorer_identity(models)
    )
    board = leaderboard.read(params.leaderboard)
    earlier = [m for m in panel if leaderboard.has(board, m.identity, prompt_sha, protocol)]
    return EvaluationPlan(prompts, chosen, panel, earlier, prompt_sha, protocol, board)


def shard_batches(sizes: list[int], batch_size: int, shard: Shard) -> list[list[slice]]:
    """Shard K/N's batches, per model, as slices of that model's images (`sizes`: how many each
    model has, in order): the batches a fresh single-process run makes, each whole, so that every
    image comes out the same. The shards take contiguous runs of the models' batches, as even as
    batches allow, so that a shard loads as few models as it can: loading a pipeline costs more
    than a batch of tiny images."""
    units = [
        (m, slice(start, min(start + batch_size, size)))
        for m, size in enumerate(sizes)
        for start in range(0, size, batch_size)
    ]
    mine = contiguous_share(units, shard)
    return [[batch for m, batch in mine if m == model] for model in range(len(sizes))]


def generate_shard(
    params: EvaluateParams,
    models: ModelsParams,
    model_dir: Path,
    shard: Shard,
    progress: bool = True,
    storage: StorageParams | None = None,
    promote: PromoteParams | None = None,
) -> tuple[int, int]:
    """Shard K/N of the stage's generation, for every model it scores: fills the image cache and
    writes no output (the stage scores and reports). Returns (images in the shard, generated now).
    Only the models the shard generates with are read (their fingerprints, their weights)."""
    plan = plan_evaluation(params, models, model_dir, storage, promote)
    cache = ImageCache(params.cache_dir)
    images_per_model = len(plan.prompts) * len(params.seeds)  # plan_images' rows: every (prompt, seed)
    mine = shard_batches([images_per_model] * len(plan.scored), params.batch_size, shard)
    generated = 0
    for model, slices in zip(plan.scored, mine, strict=True):
        if not slices:
            continue
        jobs = plan_images(model, plan.prompts, params, models)
        todo = [jobs[s] for s in slices if any(not cache.has(j["key"]) for j in jobs[s])]
        generated += generate_batches(model, todo, params, models, cache, progress)
    return sum(s.stop - s.start for slices in mine for s in slices), generated


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
    plan = plan_evaluation(params, models, model_dir, storage, promote)
    prompts, chosen, panel, earlier = plan.prompts, plan.chosen, plan.panel, plan.earlier
    prompt_sha, protocol, board, scored = plan.prompt_sha, plan.protocol, plan.board, plan.scored
    cache = ImageCache(params.cache_dir)
    jobs = pd.concat(
        [generate_for_model(m, prompts, params, models, cache, progress)[0] for m in scored], ignore_index=True
    )
    scorer = ImageTextScorer(models, batch_size=params.scorer_batch_size, workers=params.scorer_workers)
    metrics = scorer.score([cache.path(k) for k in jobs["key"]], jobs["prompt"].tolist(), progress)
    scores = jobs.assign(**{k: v.astype(float) for k, v in metrics.items()})
    scores["image"] = [
        f"images/{m}/{p}__seed{s}.png"
        for m, p, s in zip(scores["model"], scores["prompt_id"], scores["seed"], strict=True)
    ]
    # The gate reads this file: the summary records its sha256 so that a swapped or edited copy is stale.
    # Panel models' rows are in it too; the gate reads only the candidate's and the reference's.
    scores_csv = scores.drop(columns=["key"]).to_csv(index=False).encode("utf-8")
    others = [m.name for m in chosen if m.name != "candidate"]
    b = params.bootstrap
    board_rows = [
        leaderboard.row(
            _board_name(m),
            _role(m),
            m.origin,
            m.identity,
            summarize(scores[scores["model"] == m.name]),
            prompt_sha,
            protocol,
            params.seeds,
        )
        for m in scored
    ]
    board_now = leaderboard.upsert(board, board_rows)
    ranking = leaderboard.standings(board_now, prompt_sha, protocol)
    summary = score_summary(scores, others, b.confidence, b.resamples, b.seed) | {
        "model_fingerprint": chosen[0].identity.removeprefix("sha256:"),
        "production_version": next((m.version for m in chosen if m.name == "production"), None),
        "prompt_set_sha256": prompt_sha,
        "scores_sha256": hashlib.sha256(scores_csv).hexdigest(),
        "prompts": len(prompts),
        "seeds": list(params.seeds),
        "scorer": scorer.model_name,
        "generation": {
            "guidance": generation_settings(params, models).guidance.describe(),
            "max_token_length": models.max_token_length,
            "long_prompt_mode": models.long_prompt_mode,
            "sampler": params.sampler,
            "steps": params.num_inference_steps,
            "height": params.height,
            "width": params.width,
        },
        # Scored like the candidate, on the leaderboard; no paired comparison (those stay against production or base).
        "panel": {
            m.name: {"model_fingerprint": m.identity, "ref": m.origin, "scored": "earlier" if m in earlier else "now"}
            for m in panel
        },
        "leaderboard": {"path": params.leaderboard, "protocol_sha256": protocol, "models": len(ranking)},
    }
    # The grid shows the models already on the leaderboard too, from the image cache when their images are there.
    before = pd.DataFrame(
        [job for m in earlier for job in plan_images(m, prompts, params, models)], columns=jobs.columns
    )
    before["image"] = [
        f"images/{r.model}/{r.prompt_id}__seed{r.seed}.png" if cache.has(r.key) else None for r in before.itertuples()
    ]
    gallery = pd.concat([scores, before], ignore_index=True) if len(before) else scores
    in_run: dict[str, list[str]] = {}
    for m in [*chosen, *panel]:
        in_run.setdefault(m.identity, []).append(m.name)
    md = _markdown(summary, _leaderboard_md(ranking, in_run, params.leaderboard, len(board_now) - len(ranking)))
    out_dir = Path(params.out_dir)
    with atomic_dir(out_dir) as tmp:
        for row in gallery[gallery["image"].notna()].itertuples():
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
        atomic_write_text(tmp / "report.md", md)
        _write_report(tmp / "report.html", scores, gallery, summary, md, tmp)
    # Re-read under the lock: rows that another evaluation added meanwhile are kept.
    leaderboard.update(params.leaderboard, board_rows)
    if metrics_path is not None:
        atomic_write_json(metrics_path, summary)
    if plots_path is not None:  # per-image scores for `dvc plots` (outside the stage's out folder)
        columns = ["model", "prompt_id", "category", "seed", "aesthetic_score", "clip_score"]
        atomic_write_text(plots_path, scores[columns].to_csv(index=False))
    return EvaluateSummary(
        int((scores["model"] == "candidate").sum()), summary, out_dir / "report.html", out_dir / "scores.csv"
    )
