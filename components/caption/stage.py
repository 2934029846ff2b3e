"""The caption stage: run the enabled captioners over accepted images, merge, write, report.

Resumable and incremental: each captioner's output is cached per (captioner key, image sha256)
in an append-only journal, written after every batch. A killed run continues where it stopped;
a re-run with the same configuration computes nothing; changing one captioner recomputes only
its column; changing the template, trigger, thresholds or replacements recomputes no model at
all. Each image is decoded once per batch, whichever captioners need it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from components import report
from components.caption.blip import BlipCaptioner
from components.caption.merge import clip_comma_id, clip_token_ids, merge_caption
from components.caption.tagger import WDTagger, select_tags
from components.config import CaptionParams, ModelsParams
from components.errors import EaselError
from components.fsutil import atomic_write_json, atomic_write_parquet, read_stage_table
from components.images import load_rgb, thumbnail
from components.models.loaders import default_device, dtype_for
from components.sdxl.prompt_encoding import tokens_read
from components.sharding import Shard, batches, new_part_name, share

log = logging.getLogger(__name__)

DTYPES = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}


class CaptionCache:
    """(captioner key, sha256) -> output, persisted as JSON lines; a torn last line is ignored.

    The stage appends to `path` (cache.jsonl); a shard run appends to a part of its own in
    `cache.parts/`, so that concurrent shards never write one file. Reading takes them all.
    """

    def __init__(self, path: Path, part: str | None = None) -> None:
        self.parts = path.parent / "cache.parts"
        self.path = self.parts / part if part else path
        self.entries: dict[tuple[str, str], object] = {}
        for journal in [path, *sorted(self.parts.glob("*.jsonl"))]:
            if not journal.is_file():
                continue
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    self.entries[(item["captioner"], item["sha256"])] = item["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str, sha: str) -> object | None:
        return self.entries.get((key, sha))

    def add_many(self, key: str, items: list[tuple[str, object]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for sha, output in items:
                fh.write(json.dumps({"captioner": key, "sha256": sha, "output": output}) + "\n")
                self.entries[(key, sha)] = output


def build_captioners(params: CaptionParams, models: ModelsParams) -> list:
    device = default_device()
    dtype = dtype_for(DTYPES[params.dtype])
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 matmuls are not supported on every CPU
    captioners = []
    if params.blip.enabled:
        captioners.append(BlipCaptioner(models, params.blip, dtype, device))
    if params.tagger.enabled:
        captioners.append(WDTagger(models, params.tagger, dtype, device))
    if not captioners:
        raise EaselError("params.yaml: caption: enable at least one captioner (caption.blip or caption.tagger)")
    return captioners


def caption_images(
    accepted: pd.DataFrame,
    captioners: list,
    cache: CaptionCache,
    batch_size: int,
    progress: bool,
    shard: Shard | None = None,
) -> dict[str, str]:
    """Fill the cache for every (captioner, image) it lacks; returns {sha256: error} for failures.

    With a shard, only that shard's share of the batches (caption_batches).
    """

    def lacks(r) -> bool:
        return any(cache.get(c.key, r.sha256) is None for c in captioners)

    todo = caption_batches(accepted, batch_size, lacks, shard)
    failures: dict[str, str] = {}
    bar = tqdm(total=sum(map(len, todo)), desc="caption", unit="img", disable=not progress)
    for batch in todo:
        read, images = [], []
        for r in batch:
            try:
                images.append(load_rgb(r.image_path))  # decoded once for every captioner
                read.append(r)
            except Exception as exc:  # a file that decoded in validate but not now: report, skip
                failures[r.sha256] = f"{type(exc).__name__}: {exc}"
        for captioner in captioners:
            missing = [i for i, r in enumerate(read) if cache.get(captioner.key, r.sha256) is None]
            if missing:
                outputs = captioner([images[i] for i in missing])
                cache.add_many(captioner.key, [(read[i].sha256, out) for i, out in zip(missing, outputs, strict=True)])
        bar.update(len(batch))
    bar.close()
    return failures


def caption_batches(accepted: pd.DataFrame, batch_size: int, lacks: Callable, shard: Shard | None) -> list[list]:
    """The batches of accepted images to caption. A single process batches the images that lack a
    caption; a shard takes its share (components.sharding) of the batches a fresh single-process
    run makes, each batch whole, so that every caption comes out the same, and does those that
    still lack one."""
    rows = list(accepted.itertuples())
    if shard is None:
        return batches([r for r in rows if lacks(r)], batch_size)
    return [batch for batch in share(batches(rows, batch_size), shard) if any(lacks(r) for r in batch)]


def read_accepted(validate_dir: Path) -> pd.DataFrame:
    return read_stage_table(
        validate_dir / "accepted.parquet", "caption", "validate", "accepted images", ("sha256", "image_path")
    )


def caption_shard(
    params: CaptionParams, models: ModelsParams, validate_dir: Path, shard: Shard, progress: bool = True
) -> tuple[int, int]:
    """Shard K/N of the stage's captioning: fills the caption cache for this shard's batches and
    writes no output. Returns (images in the shard, images captioned now)."""
    accepted = read_accepted(validate_dir)
    captioners = build_captioners(params, models)
    cache = CaptionCache(Path(params.out_dir) / "cache.jsonl", part=new_part_name(shard[0]))

    def lacks(r) -> bool:
        return any(cache.get(c.key, r.sha256) is None for c in captioners)

    mine = shard_rows(accepted, params.batch_size, shard)
    before = sum(map(lacks, mine))
    failures = caption_images(accepted, captioners, cache, params.batch_size, progress, shard)
    return len(mine), before - len(failures)


def shard_rows(accepted: pd.DataFrame, batch_size: int, shard: Shard) -> list:
    """Shard K/N's accepted rows: its share of the whole batches (caption_batches)."""
    return [r for batch in share(batches(list(accepted.itertuples()), batch_size), shard) for r in batch]


def shard_files(params: CaptionParams, validate_dir: Path, root: Path, shard: Shard) -> list[str]:
    """The image files (relative to `root`, a shard's folder holding the stage's other inputs) that
    shard K/N may read: those of its share of the batches."""
    accepted = read_accepted(root / validate_dir)
    return [Path(r.image_path).as_posix() for r in shard_rows(accepted, params.batch_size, shard)]


@dataclass
class CaptionSummary:
    images: int
    computed: int
    cached: int
    failed: int
    over_token_limit: int
    table: Path
    report: Path


def run_caption(
    params: CaptionParams,
    models: ModelsParams,
    validate_dir: Path,
    metrics_path: Path | None = None,
    progress: bool = True,
) -> CaptionSummary:
    out_dir = Path(params.out_dir)
    accepted = read_accepted(validate_dir)
    captioners = build_captioners(params, models)
    cache = CaptionCache(out_dir / "cache.jsonl")
    fully_cached = sum(all(cache.get(c.key, sha) is not None for c in captioners) for sha in accepted["sha256"])
    failures = caption_images(accepted, captioners, cache, params.batch_size, progress)

    source_col = f"src_{params.source_caption_column}"
    keys = {c.name: c.key for c in captioners}
    rows = []
    comma = clip_comma_id()
    for r in accepted.itertuples():
        if r.sha256 in failures:
            continue
        source = getattr(r, source_col, None) if source_col in accepted.columns else None
        source = str(source).strip() if source is not None and not pd.isna(source) and str(source).strip() else None
        blip = cache.get(keys["blip"], r.sha256) if "blip" in keys else None
        scored = cache.get(keys["tagger"], r.sha256) if "tagger" in keys else None
        tags = select_tags(scored, params.tagger) if scored is not None else []
        caption = merge_caption(
            params.template,
            trigger=params.trigger,
            source=source,
            blip=blip,
            tags=tags,
            replacements=params.replacements,
            word_replacements=params.word_replacements,
            exclude=params.tagger.exclude,
            max_tags=params.tagger.max_tags,
        )
        ids = clip_token_ids(caption)
        tokens = len(ids)
        rows.append(
            {
                "sha256": r.sha256,
                "image_path": r.image_path,
                "caption": caption,
                "source_caption": source,
                "blip_caption": blip,
                "tags": tags,
                "clip_tokens": tokens,
                # Cut where training and generation read it (a1111's comma breaks can cut a shorter one).
                "over_token_limit": tokens_read(ids, models.max_token_length, models.long_prompt_mode, comma) < tokens,
                "captioners": json.dumps(keys),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        raise EaselError("caption: no image could be captioned: " + "; ".join(list(failures.values())[:3]))
    over = int(table["over_token_limit"].sum())
    if over:
        log.warning(
            "%d of %d captions are cut at %d tokens (models.max_token_length, long_prompt_mode %s): training and "
            "generation read less of them",
            over,
            len(table),
            models.max_token_length,
            models.long_prompt_mode,
        )
    atomic_write_parquet(out_dir / "captions.parquet", table)
    report_path = _write_report(
        out_dir / "report.html", table, failures, keys, params.template, models.max_token_length, accepted
    )
    summary = CaptionSummary(
        len(accepted),
        len(accepted) - fully_cached - len(failures),
        fully_cached,
        len(failures),
        over,
        out_dir / "captions.parquet",
        report_path,
    )
    if metrics_path is not None:
        atomic_write_json(
            metrics_path,
            {
                "captioned": len(table),
                "failed": len(failures),
                "mean_words": round(float(table["caption"].str.split().str.len().mean()), 2),
                "mean_clip_tokens": round(float(table["clip_tokens"].mean()), 2),
                "over_token_limit": over,
                "mean_tags": round(float(table["tags"].str.len().mean()), 2),
            },
        )
    return summary


def _write_report(
    path: Path,
    table: pd.DataFrame,
    failures: dict,
    keys: dict,
    template: str,
    max_token_length: int,
    accepted: pd.DataFrame,
) -> Path:
    sample = table.head(60)
    cards = [
        report.card(
            thumbnail(r.image_path),
            f"{r.caption} [{r.clip_tokens} tokens]" + (" CUT" if r.over_token_limit else ""),
        )
        for r in sample.itertuples()
    ]
    over = int(table["over_token_limit"].sum())
    sections = [
        (
            "Captions" + (f" (first {len(sample)} of {len(table)})" if len(table) > len(sample) else ""),
            report.grid(cards),
        )
    ]
    if over:
        sections.insert(
            0,
            (
                "Warning",
                f"<p class='fail'>{over} of {len(table)} captions exceed {max_token_length} tokens "
                "(models.max_token_length): training and generation cut them there; 150 or 225 reads more.</p>",
            ),
        )
    if failures:
        paths = dict(zip(accepted["sha256"], accepted["image_path"], strict=True))
        sections.append(
            (
                "Skipped (could not be read)",
                report.table_html(["image", "error"], [(paths[s], e) for s, e in failures.items()]),
            )
        )
    return report.write_html(
        path,
        "Easel captions",
        sections,
        intro=f"Template <code>{report.esc(template)}</code>; captioners "
        + ", ".join(f"{report.esc(k)} = {report.esc(v)}" for k, v in keys.items())
        + ".",
    )
