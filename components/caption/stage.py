"""The caption stage: run the enabled captioners over accepted images, merge, write, report.

Resumable and incremental: each captioner's output is cached per (captioner key, image sha256)
in an append-only journal, written after every batch. A killed run continues where it stopped;
a re-run with the same configuration computes nothing; changing one captioner recomputes only
its column; changing the template, trigger, thresholds or replacements recomputes no model at
all. Each image is decoded once per batch, whichever captioners need it.

Memory does not grow with the number of images: accepted.parquet is read CHUNK_ROWS rows at a
time (the batches run on across chunks, so they hold the same images whatever the chunk size),
the journal is looked up through an index on disk, and captions.parquet is written a row group per
chunk, with the metrics and the report made from running sums and the first captions.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from components import report
from components.caption.blip import BlipCaptioner
from components.caption.merge import clip_comma_id, clip_token_ids, merge_caption
from components.caption.tagger import WDTagger, select_tags
from components.config import CaptionParams, ModelsParams
from components.images import load_rgb, thumbnail
from components.models.loaders import default_device, dtype_for
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import ParquetRowGroups, atomic_write_json, stage_table_chunks
from components.plumbing.scratch import ScratchDir, remove_abandoned_temps
from components.sdxl.prompt_encoding import tokens_read
from components.sharding import Shard, deal, new_part_name, stream_batches, stream_share

log = logging.getLogger(__name__)

DTYPES = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}
# Accepted rows read (and caption rows written) at a time, looked up at call time (tests make it
# small). A chunk's caption rows hold every tag the tagger chose: with the tiny tagger's 300 a row,
# about 40 KB a row in flight (measured), so a chunk of 2,000 rows takes some 80 MB.
CHUNK_ROWS = 2_000
INDEX_BATCH = 5000  # journal entries per insert into the cache's index
REPORT_CARDS = 60  # the report shows the first captions, not every one

# captions.parquet's columns, typed once so that every row group has the same schema.
CAPTIONS_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("source_caption", pa.string()),
        ("blip_caption", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("clip_tokens", pa.int64()),
        ("over_token_limit", pa.bool_()),
        ("captioners", pa.string()),
    ]
)


class CaptionCache:
    """(captioner key, sha256) -> output, persisted as JSON lines; a line that is not a whole entry
    (a torn last line) is ignored, and of two lines for one entry the later wins.

    The stage appends to `path` (cache.jsonl); a shard run appends to a part of its own in
    `cache.parts/`, so that concurrent shards never write one file. Reading takes them all: where
    each entry's latest line lies (file, offset, length) goes into a SQLite index in a scratch
    folder, and an output is read back from its line when asked for, so memory does not grow with
    the number of images. Use it in a `with` block: leaving it removes the index.
    """

    def __init__(self, path: Path, part: str | None = None) -> None:
        parts = path.parent / "cache.parts"
        self.path = parts / part if part else path
        self.files = [path, *sorted(parts.glob("*.jsonl"))]
        if self.path not in self.files:
            self.files.append(self.path)
        self._written = self.files.index(self.path)
        self._fds: dict[int, int] = {}
        self._scratch = ScratchDir("caption")
        self.db = sqlite3.connect(self._scratch.path / "index.sqlite")
        # A scratch index, rebuilt from the journal on every run: no durability needed.
        self.db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -32768;
            CREATE TABLE entries (
                captioner TEXT NOT NULL, sha256 TEXT NOT NULL, file INTEGER NOT NULL, start INTEGER NOT NULL,
                length INTEGER NOT NULL, PRIMARY KEY (captioner, sha256)
            ) WITHOUT ROWID;
            """
        )
        for number, journal in enumerate(self.files):
            if journal.is_file():
                self._index(number, journal)

    def __enter__(self) -> CaptionCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.db.close()
        self._scratch.cleanup()

    def _index(self, number: int, journal: Path) -> None:
        """Note where each whole entry of one journal file lies, line by line."""
        rows: list[tuple[str, str, int, int, int]] = []
        start = 0
        with open(journal, "rb") as fh:
            for line in fh:
                if (entry := _entry_of(line)) is not None:
                    rows.append((*entry, number, start, len(line)))
                start += len(line)
                if len(rows) >= INDEX_BATCH:
                    self._note(rows)
                    rows.clear()
        self._note(rows)

    def _note(self, rows: list[tuple[str, str, int, int, int]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", rows)

    def has(self, key: str, sha: str) -> bool:
        """Whether the captioner has an output for the image."""
        query = "SELECT 1 FROM entries WHERE captioner = ? AND sha256 = ?"
        return self.db.execute(query, (key, sha)).fetchone() is not None

    def lacks(self, keys: list[str], sha: str) -> bool:
        """Whether any of these captioners has no output for the image."""
        return not all(self.has(key, sha) for key in keys)

    def get(self, key: str, sha: str) -> object | None:
        """The captioner's output for the image, read back from its journal line, or None."""
        query = "SELECT file, start, length FROM entries WHERE captioner = ? AND sha256 = ?"
        found = self.db.execute(query, (key, sha)).fetchone()
        if found is None:
            return None
        number, start, length = found
        if number not in self._fds:
            self._fds[number] = os.open(self.files[number], os.O_RDONLY)
        return json.loads(os.pread(self._fds[number], length, start))["output"]

    def add_many(self, key: str, items: list[tuple[str, object]]) -> None:
        """Journal the captioner's outputs, (sha256, output) pairs, and index them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        with open(self.path, "ab") as fh:
            for sha, output in items:
                line = (json.dumps({"captioner": key, "sha256": sha, "output": output}) + "\n").encode()
                rows.append((key, sha, self._written, fh.tell(), len(line)))
                fh.write(line)
        self._note(rows)


def _entry_of(line: bytes) -> tuple[str, str] | None:
    """A journal line's (captioner key, sha256), or None for a line that is not a whole entry."""
    try:
        item = json.loads(line)
        key, sha, output = item["captioner"], item["sha256"], item["output"]
    except (ValueError, KeyError, TypeError):  # ValueError: torn JSON, or bytes cut inside a character
        return None
    return (key, sha) if isinstance(key, str) and isinstance(sha, str) and output is not None else None


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
    todo: Iterable[list], count: int, captioners: list, cache: CaptionCache, progress: bool
) -> dict[str, tuple[str, str]]:
    """Fill the cache for every (captioner, image) of these batches (caption_batches) that it lacks;
    `count` images lack one, for the progress bar. Returns {sha256: (image path, error)} for the
    images that could not be read."""
    keys = [c.key for c in captioners]
    failures: dict[str, tuple[str, str]] = {}
    with tqdm(total=count, desc="caption", unit="img", disable=not progress) as bar:
        for batch in todo:
            lacking = sum(cache.lacks(keys, r.sha256) for r in batch)
            read, images = [], []
            for r in batch:
                try:
                    images.append(load_rgb(r.image_path))  # decoded once for every captioner
                    read.append(r)
                except Exception as exc:  # a file that decoded in validate but not now: report, skip
                    failures[r.sha256] = (r.image_path, f"{type(exc).__name__}: {exc}")
            for captioner in captioners:
                missing = [i for i, r in enumerate(read) if not cache.has(captioner.key, r.sha256)]
                if missing:
                    outputs = captioner([images[i] for i in missing])
                    items = [(read[i].sha256, out) for i, out in zip(missing, outputs, strict=True)]
                    cache.add_many(captioner.key, items)
            bar.update(lacking)
    return failures


def caption_batches(rows: Iterable, batch_size: int, lacks: Callable, shard: Shard | None) -> Iterator[list]:
    """The batches of accepted images to caption, formed as the rows come. A single process batches
    the images that lack a caption; a shard takes its share (components.sharding) of the batches a
    fresh single-process run makes, each batch whole, so that every caption comes out the same, and
    does those that still lack one. (Accepted images are distinct, so whether one lacks a caption
    does not change before its batch runs.)"""
    if shard is None:
        return stream_batches((r for r in rows if lacks(r)), batch_size)
    return (batch for batch in stream_share(stream_batches(rows, batch_size), shard) if any(map(lacks, batch)))


def accepted_chunks(validate_dir: Path, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """accepted.parquet (only `columns`, if given), CHUNK_ROWS rows at a time."""
    path = validate_dir / "accepted.parquet"
    required = ("sha256", "image_path")
    return stage_table_chunks(path, "caption", "validate", "accepted images", required, columns, CHUNK_ROWS)


def accepted_rows(validate_dir: Path) -> Iterator:
    """accepted.parquet's sha256 and image_path, a named tuple per row, read a chunk at a time."""
    return (r for chunk in accepted_chunks(validate_dir, ["sha256", "image_path"]) for r in chunk.itertuples())


def caption_shard(
    params: CaptionParams, models: ModelsParams, validate_dir: Path, shard: Shard, progress: bool = True
) -> tuple[int, int]:
    """Shard K/N of the stage's captioning: fills the caption cache for this shard's batches and
    writes no output. Returns (images in the shard, images captioned now)."""
    accepted_chunks(validate_dir)  # checks the table now: a missing or broken one is said first
    captioners = build_captioners(params, models)
    keys = [c.key for c in captioners]
    remove_abandoned_temps(params.out_dir)
    with CaptionCache(Path(params.out_dir) / "cache.jsonl", part=new_part_name(shard[0])) as cache:

        def lacks(r) -> bool:
            return cache.lacks(keys, r.sha256)

        mine = before = 0
        for r in shard_rows(accepted_rows(validate_dir), params.batch_size, shard):
            mine += 1
            before += lacks(r)
        todo = caption_batches(accepted_rows(validate_dir), params.batch_size, lacks, shard)
        failures = caption_images(todo, before, captioners, cache, progress)
    return mine, before - len(failures)


def shard_rows(rows: Iterable, batch_size: int, shard: Shard) -> Iterator:
    """Shard K/N's accepted rows: its share of the whole batches (caption_batches)."""
    return (r for batch in stream_share(stream_batches(rows, batch_size), shard) for r in batch)


def files_by_shard(params: CaptionParams, validate_dir: Path, root: Path, shards: int) -> list[list[str]]:
    """The image files (relative to `root`, the folder holding the stage's inputs) that each of
    `shards` shards reads: those of its share of the batches (`shard_rows`), from one read of the table."""
    dealt = deal(stream_batches(accepted_rows(root / validate_dir), params.batch_size), shards)
    return [[Path(r.image_path).as_posix() for batch in share for r in batch] for share in dealt]


@dataclass
class CaptionSummary:
    images: int
    computed: int
    cached: int
    failed: int
    over_token_limit: int
    table: Path
    report: Path


class CaptionTable:
    """captions.parquet, written a chunk of rows at a time (components.plumbing.fsutil.ParquetRowGroups: a
    failed run leaves the previous table), with what the metrics and the report need: running
    sums and the first REPORT_CARDS rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = self.words = self.tokens = self.tags = self.over = 0
        self.sample: list[dict] = []
        self._out = ParquetRowGroups(path, CAPTIONS_SCHEMA)

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.rows += len(rows)
        self.words += sum(len(r["caption"].split()) for r in rows)
        self.tokens += sum(r["clip_tokens"] for r in rows)
        self.tags += sum(len(r["tags"]) for r in rows)
        self.over += sum(r["over_token_limit"] for r in rows)
        self.sample += rows[: REPORT_CARDS - len(self.sample)]
        self._out.add(pd.DataFrame(rows, columns=CAPTIONS_SCHEMA.names))

    def finish(self) -> None:
        self._out.finish()

    def abandon(self) -> None:
        self._out.abandon()

    def metrics(self, failed: int) -> dict:
        return {
            "captioned": self.rows,
            "failed": failed,
            "mean_words": round(self.words / self.rows, 2),
            "mean_clip_tokens": round(self.tokens / self.rows, 2),
            "over_token_limit": self.over,
            "mean_tags": round(self.tags / self.rows, 2),
        }


def caption_rows(
    chunk: pd.DataFrame,
    params: CaptionParams,
    models: ModelsParams,
    keys: dict[str, str],
    cache: CaptionCache,
    failures: dict,
) -> list[dict]:
    """captions.parquet's rows for a chunk of accepted images (those that could be read): the
    captioners' cached outputs merged by the template, with their CLIP token counts."""
    source_col = f"src_{params.source_caption_column}"
    comma = clip_comma_id()
    rows = []
    for r in chunk.itertuples():
        if r.sha256 in failures:
            continue
        source = getattr(r, source_col, None) if source_col in chunk.columns else None
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
    return rows


def run_caption(
    params: CaptionParams,
    models: ModelsParams,
    validate_dir: Path,
    metrics_path: Path | None = None,
    progress: bool = True,
) -> CaptionSummary:
    out_dir = Path(params.out_dir)
    accepted_chunks(validate_dir)  # checks the table now: a missing or broken one is said first
    remove_abandoned_temps(out_dir)  # DVC keeps this folder: a killed run's half-written table goes
    captioners = build_captioners(params, models)
    keys = {c.name: c.key for c in captioners}
    with CaptionCache(out_dir / "cache.jsonl") as cache:

        def lacks(r) -> bool:
            return cache.lacks(list(keys.values()), r.sha256)

        # Three reads of accepted.parquet: count what is to do, caption it, write the table.
        todo = sum(map(lacks, accepted_rows(validate_dir)))
        failures = caption_images(
            caption_batches(accepted_rows(validate_dir), params.batch_size, lacks, None),
            todo,
            captioners,
            cache,
            progress,
        )
        table = CaptionTable(out_dir / "captions.parquet")
        images = 0
        try:
            for chunk in accepted_chunks(validate_dir):
                images += len(chunk)
                table.add(caption_rows(chunk, params, models, keys, cache, failures))
            if not table.rows:
                errors = [error for _, error in failures.values()]
                raise EaselError("caption: no image could be captioned: " + "; ".join(errors[:3]))
            if table.over:
                log.warning(
                    "%d of %d captions are cut at %d tokens (models.max_token_length, long_prompt_mode %s): training "
                    "and generation read less of them",
                    table.over,
                    table.rows,
                    models.max_token_length,
                    models.long_prompt_mode,
                )
            table.finish()
        except BaseException:
            table.abandon()
            raise
    report_path = _write_report(
        out_dir / "report.html", table, failures, keys, params.template, models.max_token_length
    )
    summary = CaptionSummary(
        images, todo - len(failures), images - todo, len(failures), table.over, table.path, report_path
    )
    if metrics_path is not None:
        atomic_write_json(metrics_path, table.metrics(len(failures)))
    return summary


def _write_report(
    path: Path, table: CaptionTable, failures: dict, keys: dict, template: str, max_token_length: int
) -> Path:
    cards = [
        report.card(
            thumbnail(r["image_path"]),
            f"{r['caption']} [{r['clip_tokens']} tokens]" + (" CUT" if r["over_token_limit"] else ""),
        )
        for r in table.sample
    ]
    sections = [
        (
            "Captions" + (f" (first {len(table.sample)} of {table.rows})" if table.rows > len(table.sample) else ""),
            report.grid(cards),
        )
    ]
    if table.over:
        sections.insert(
            0,
            (
                "Warning",
                f"<p class='fail'>{table.over} of {table.rows} captions exceed {max_token_length} tokens "
                "(models.max_token_length): training and generation cut them there; 150 or 225 reads more.</p>",
            ),
        )
    if failures:
        sections.append(
            (
                "Skipped (could not be read)",
                report.table_html(["image", "error"], list(failures.values())),
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
