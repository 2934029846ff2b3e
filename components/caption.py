"""Caption stage: a BLIP captioner (transformers) writes one caption per accepted image.

Batched on whatever device exists. Captions are cached per (image sha256, captioner config) in
an append-only journal, so a killed run continues where it stopped and a re-run with the same
configuration recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from components import report
from components.config import CaptionParams, ModelsParams
from components.errors import EaselError
from components.fsutil import atomic_write_json, atomic_write_parquet
from components.images import load_rgb, thumbnail
from components.models.loaders import default_device, load_blip

log = logging.getLogger(__name__)


def captioner_key(models: ModelsParams, params: CaptionParams) -> str:
    """Identifies a captioner configuration: a change to any of these recomputes the captions."""
    config = {
        "model": models.blip,
        "revision": models.revision,
        "prompt": params.prompt,
        "max_new_tokens": params.max_new_tokens,
        "num_beams": params.num_beams,
    }
    return "blip-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


class CaptionCache:
    """(captioner key, sha256) -> caption, persisted as JSON lines (torn last line ignored)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    self.entries[(item["captioner"], item["sha256"])] = item["caption"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str, sha: str) -> str | None:
        return self.entries.get((key, sha))

    def add_many(self, key: str, items: list[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for sha, caption in items:
                fh.write(json.dumps({"captioner": key, "sha256": sha, "caption": caption}) + "\n")
                self.entries[(key, sha)] = caption


def caption_batch(model, processor, images: list, params: CaptionParams) -> list[str]:
    inputs = processor(
        images=images,
        text=[params.prompt] * len(images) if params.prompt else None,
        return_tensors="pt",
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=params.max_new_tokens, num_beams=params.num_beams)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


@dataclass
class CaptionSummary:
    images: int
    computed: int
    cached: int
    failed: int
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
    accepted_path = validate_dir / "accepted.parquet"
    if not accepted_path.is_file():
        raise EaselError(f"caption: {accepted_path} not found; run the validate stage first")
    accepted = pd.read_parquet(accepted_path)
    if accepted.empty:
        raise EaselError(f"caption: {accepted_path} holds no accepted images; nothing to caption")
    key = captioner_key(models, params)
    cache = CaptionCache(out_dir / "cache.jsonl")
    todo = [r for r in accepted.itertuples() if cache.get(key, r.sha256) is None]
    failures: dict[str, str] = {}
    if todo:
        model, processor = load_blip(models, device=default_device())
        bar = tqdm(total=len(todo), desc="caption", unit="img", disable=not progress)
        for start in range(0, len(todo), params.batch_size):
            batch = todo[start : start + params.batch_size]
            images, shas = [], []
            for r in batch:
                try:
                    images.append(load_rgb(r.image_path))
                    shas.append(r.sha256)
                except Exception as exc:  # a file that decoded in validate but not now: report, skip
                    failures[r.sha256] = f"{type(exc).__name__}: {exc}"
            if images:
                cache.add_many(key, list(zip(shas, caption_batch(model, processor, images, params), strict=True)))
            bar.update(len(batch))
        bar.close()
    rows = [
        {
            "sha256": r.sha256,
            "image_path": r.image_path,
            "caption": cache.get(key, r.sha256),
            "captioner": key,
            "error": failures.get(r.sha256),
        }
        for r in accepted.itertuples()
    ]
    table = pd.DataFrame(rows)
    captioned = table[table["caption"].notna()].reset_index(drop=True)
    if captioned.empty:
        raise EaselError("caption: no image could be captioned; see the errors in the log")
    atomic_write_parquet(out_dir / "captions.parquet", captioned)
    cards = [report.card(thumbnail(r.image_path), r.caption) for r in captioned.itertuples()]
    report_path = report.write_html(
        out_dir / "report.html",
        "Easel captions",
        [("Captions", report.grid(cards))]
        + ([("Failed", report.table_html(["sha256", "error"], failures.items()))] if failures else []),
        intro=f"Captioner {report.esc(key)} = {report.esc(models.blip)}.",
    )
    summary = CaptionSummary(
        len(accepted),
        len(todo) - len(failures),
        len(accepted) - len(todo),
        len(failures),
        out_dir / "captions.parquet",
        report_path,
    )
    if metrics_path is not None:
        words = captioned["caption"].str.split().str.len()
        atomic_write_json(
            metrics_path,
            {
                "captioned": len(captioned),
                "failed": len(failures),
                "mean_words": round(float(words.mean()), 2),
            },
        )
    return summary
