"""The validate stage: metadata table -> GX suite -> near-duplicates -> curation -> outputs.

One table row per downloaded manifest row (an image listed twice is two rows: the second is an
`exact_duplicate`); each distinct file is read and decoded once. Outputs in out_dir:
  accepted.parquet   every accepted image, with `image_path` to open for training
  rejected.parquet   every rejected image with `reasons` (every rule it failed)
  gx_results.json    Great Expectations' validation result; data_docs/ its HTML Data Docs
  report.html        the one-page summary a person reads
  images/            training-ready copies (rotated / converted), only where needed

Memory does not grow with the manifest: it is read CHUNK_ROWS rows at a time, in two passes.
The first builds each chunk's metadata table, runs the GX suite on it and spills the judged rows
to a scratch Parquet file; what is decided over the whole set (exact duplicates through a SQLite
index of first copies, near-duplicates and curation over compact arrays) sits between the passes;
the second pass adds those verdicts and writes the outputs and the report's running totals.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from components import report
from components.config import AssumeDpi, ModelsParams, ValidateParams
from components.images import thumbnail
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import ArchivedFile, ParquetRowGroups, atomic_dir, atomic_write_json, stage_table_chunks
from components.plumbing.scratch import ScratchDir
from components.sharding import Shard, share, stable_hash
from components.validate.dedupe import Candidate, choose_kept, hash_groups
from components.validate.inspect import EMPTY_ROW, InspectionCache, inspect_cached, inspection_pool
from components.validate.normalize import needs_copy, write_training_copy
from components.validate.rules import SuiteRunner, rules_for

log = logging.getLogger(__name__)

CHUNK_ROWS = 20_000  # manifest rows judged at a time (about 2 KB each in the table and GX's copy)

# The types of inspect_image's fields in the table, explicit so that every chunk writes the same schema.
INFO_DTYPES = {
    "format": "string",
    "mode": "string",
    "width": "Int64",
    "height": "Int64",
    "dpi": "Float64",
    "icc_profile": bool,
    "exif_orientation": "Int64",
    "animated": bool,
    "header_read": bool,
    "decodable": bool,
    "decode_error": "string",
    "phash": "string",
}


MANIFEST_COLUMNS = ("source", "row", "url", "status", "sha256", "path", "bytes")  # what the stage reads


@dataclass
class ManifestFacts:
    """What the first read of the manifest tells: its size and which sources fill the caption column."""

    rows: int = 0
    ok: int = 0
    captioned_sources: set[str] = field(default_factory=set)


def manifest_chunks(
    download_dir: Path, columns: list[str] | None = None, required: tuple[str, ...] = MANIFEST_COLUMNS
) -> Iterator[pd.DataFrame]:
    """The manifest's rows, CHUNK_ROWS (looked up at call time) at a time; an empty manifest gives
    one empty frame. A missing, unreadable or incomplete manifest is refused at the call."""
    path = download_dir / "manifest.parquet"
    return stage_table_chunks(path, "validate", "download", None, required, columns, CHUNK_ROWS)


def manifest_facts(
    download_dir: Path, params: ValidateParams, required: tuple[str, ...] = MANIFEST_COLUMNS
) -> ManifestFacts:
    """Counts the manifest's rows and finds the sources with captions; refuses a manifest with no
    downloaded image unless validate.min_accepted is 0."""
    caption_col = f"src_{params.caption_column}" if params.caption_column else None
    facts = ManifestFacts()
    for chunk in manifest_chunks(download_dir, None, required):
        ok = chunk[chunk["status"] == "ok"]
        facts.rows += len(chunk)
        facts.ok += len(ok)
        # A source "has" captions if any of its downloaded rows filled the column.
        if caption_col in ok.columns and "source" in ok.columns:
            facts.captioned_sources.update(ok.loc[ok[caption_col].notna(), "source"].astype(str))
    if params.min_accepted and not facts.ok:
        # Nothing to judge: writing empty accepted/rejected sets would replace the last good ones.
        raise EaselError(
            f"validate: {download_dir / 'manifest.parquet'} lists no downloaded images ({facts.rows} rows, none ok); "
            "fix the download first (validate.min_accepted: 0 allows an empty set)"
        )
    return facts


def read_manifest(download_dir: Path, params: ValidateParams) -> pd.DataFrame:
    """The whole manifest (a shard's share is picked from it)."""
    required = ("status", "sha256", "path")
    manifest_facts(download_dir, params, required)
    return pd.concat(list(manifest_chunks(download_dir, None, required)), ignore_index=True)


class FirstCopies:
    """The first row (its URL) of every distinct file seen so far, in a scratch SQLite file: which
    rows are exact duplicates, and of what, without holding every sha256 in memory."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            CREATE TABLE first (sha256 TEXT PRIMARY KEY, url TEXT NOT NULL) WITHOUT ROWID;
            """
        )

    def close(self) -> None:
        self.db.close()

    def mark(self, shas: list[str], urls: list[str]) -> tuple[list[bool], list[str | None]]:
        """(is the first copy, URL of the first copy for a later one) for the next rows, in order."""
        distinct = list(dict.fromkeys(shas))
        known: dict[str, str] = {}
        for start in range(0, len(distinct), 500):  # well under SQLite's bound-parameter limit
            part = distinct[start : start + 500]
            query = f"SELECT sha256, url FROM first WHERE sha256 IN ({','.join('?' * len(part))})"
            known.update(self.db.execute(query, part).fetchall())
        new: dict[str, str] = {}
        firsts, duplicate_of = [], []
        for sha, url in zip(shas, urls, strict=True):
            earlier = known.get(sha) or new.get(sha)
            if earlier is None:
                new[sha] = url
            firsts.append(earlier is None)
            duplicate_of.append(earlier)
        self.db.executemany("INSERT INTO first VALUES (?, ?)", new.items())
        return firsts, duplicate_of


def metadata_table(
    ok: pd.DataFrame, info: dict[str, dict], params: ValidateParams, firsts: FirstCopies, captioned: set[str]
) -> pd.DataFrame:
    """The table GX checks for a chunk of downloaded rows: their manifest columns, each file's
    metadata from `info` ({sha256: inspect_image row}), and what the rules read from them."""
    columns = [c for c in MANIFEST_COLUMNS if c != "status"] + [c for c in ok.columns if c.startswith("src_")]
    table = ok[columns].reset_index(drop=True)
    for column in columns:
        if column.startswith("src_"):
            table[column] = table[column].astype("string")
    meta = pd.DataFrame([info[sha] for sha in table["sha256"]], columns=list(EMPTY_ROW)).astype(INFO_DTYPES)
    table = pd.concat([table, meta], axis=1)
    width, height = table["width"].astype("Float64"), table["height"].astype("Float64")
    table["short_side"] = np.minimum(width, height).astype("Int64")
    table["long_side"] = np.maximum(width, height).astype("Int64")
    table["aspect_ratio"] = (width / height).astype("Float64")
    table["kb_per_pixel"] = (table["bytes"].astype("Float64") / 1024 / (width * height)).astype("Float64")
    assumed = params.missing_dpi.assume if isinstance(params.missing_dpi, AssumeDpi) else None
    table["dpi_assumed"] = table["dpi"].isna() & table["header_read"] & (assumed is not None)
    table["dpi_effective"] = table["dpi"].fillna(assumed) if assumed is not None else table["dpi"]
    table["dpi_policy"] = pd.Series(dpi_policies(table, params), dtype="string")
    table["frames_policy"] = pd.Series(frames_policies(table, params), dtype="string")
    caption_col = f"src_{params.caption_column}" if params.caption_column else None
    if caption_col and caption_col in table.columns:
        text = table[caption_col].str.strip()
        table["caption"] = text.mask(text == "")
        table["caption_expected"] = table["source"].astype(str).isin(captioned)
    else:
        table["caption"] = pd.Series(pd.NA, index=table.index, dtype="string")
        table["caption_expected"] = False
    is_first, duplicate_of = firsts.mark(table["sha256"].tolist(), table["url"].tolist())
    table["is_first_copy"] = is_first
    table["duplicate_of"] = pd.Series(duplicate_of, index=table.index, dtype="string")
    return table


def inspect_files(
    files: pd.DataFrame,
    download_dir: Path,
    cache: InspectionCache,
    bar: tqdm,
    pool: ProcessPoolExecutor | None,
    archived: dict[str, ArchivedFile] | None = None,
) -> dict[str, dict]:
    """{sha256: metadata row} of distinct files (columns sha256, path), through the inspection
    cache; read from `archived` ({path relative to the project: where its bytes lie}) if given."""
    where = [(download_dir / path).as_posix() for path in files["path"]]
    sources = [archived[w] for w in where] if archived is not None else where
    return inspect_cached(list(zip(files["sha256"], sources, strict=True)), cache, pool, bar.update)


def inspect_shard(
    params: ValidateParams,
    download_dir: Path,
    shard: Shard,
    progress: bool = True,
    archived: dict[str, ArchivedFile] | None = None,
) -> tuple[int, int]:
    """Shard K/N of the stage's decoding: inspects this shard's distinct files into the inspection
    cache and writes no output. The share is every N-th distinct file by sha256, or exactly the
    files `archived` names (paths relative to the project, as `download_dir` is), read in place from
    the archives the flow handed the shard. Returns (files in the shard, files inspected now)."""
    manifest = read_manifest(download_dir, params)
    if archived is None:
        mine = shard_share(manifest, shard)
    else:
        ok = manifest[manifest["status"] == "ok"].drop_duplicates("sha256")
        downloaded = {(download_dir / path).as_posix(): sha for path, sha in zip(ok["path"], ok["sha256"], strict=True)}
        for path, file in sorted(archived.items()):
            if path not in downloaded:
                raise EaselError(f"validate shard {shard[0]}/{shard[1]}: {path} is not a downloaded file")
            if file.sha256 != downloaded[path]:
                raise EaselError(
                    f"validate shard {shard[0]}/{shard[1]}: {path} was handed with another sha256 than "
                    "the manifest's; refused"
                )
        mine = ok[[(download_dir / path).as_posix() in archived for path in ok["path"]]]
    with (
        InspectionCache(params.cache_dir, params.max_image_pixels) as cache,
        tqdm(total=len(mine), desc="validate", unit="img", disable=not progress) as bar,
        inspection_pool(params.workers) as pool,
    ):
        before = sum(cache.get(sha) is None for sha in mine["sha256"])
        inspect_files(mine, download_dir, cache, bar, pool, archived)
    return len(mine), before


def shard_share(manifest: pd.DataFrame, shard: Shard | None) -> pd.DataFrame:
    """Shard K/N's distinct downloaded files (by sha256): the manifest rows it inspects."""
    ok = manifest[manifest["status"] == "ok"].drop_duplicates("sha256")
    return ok[ok["sha256"].isin(share(list(ok["sha256"]), shard, key=str))]


def files_to_inspect(params: ValidateParams, download_dir: Path, root: Path) -> dict[str, str]:
    """The image files (relative to `root`, the folder holding the stage's inputs) that the shards
    inspect between them, with their sha256: the distinct downloaded files not in the inspection
    cache yet (the flow deals them to the shards, components.shard_exchange)."""
    distinct = shard_share(read_manifest(root / download_dir, params), None)
    pairs = zip(distinct["sha256"], distinct["path"], strict=True)
    with InspectionCache(root / params.cache_dir, params.max_image_pixels) as cache:
        return {(download_dir / path).as_posix(): sha for sha, path in pairs if cache.get(sha) is None}


def dpi_policies(table: pd.DataFrame, params: ValidateParams) -> list[str]:
    """For each image, what its DPI was and which policy decided it: the tables and report say it."""
    policy = params.missing_dpi
    missing = (
        {
            "reject": "missing: rejected (missing_dpi: reject)",
            "accept": "missing: accepted unchecked (missing_dpi: accept)",
        }.get(policy)
        if isinstance(policy, str)
        else f"missing: taken as {policy.assume:g} (missing_dpi: assume)"
    )
    out = []
    for dpi, header in zip(table["dpi"], table["header_read"].astype(bool), strict=True):
        out.append("unknown: header unreadable" if not header else missing if pd.isna(dpi) else f"stated: {dpi:g}")
    return out


def frames_policies(table: pd.DataFrame, params: ValidateParams) -> list[str]:
    animated = (
        "animated: only the first frame is trained on (allow_animated: true)"
        if params.allow_animated
        else "animated: rejected (allow_animated: false)"
    )
    return [animated if bool(a) else "still" for a in table["animated"].fillna(False)]


@dataclass
class Judged:
    """The first pass's result: every row with its GX verdict, spilled to `path` (one row group per
    chunk), and the compact arrays the decisions over the whole set read."""

    path: Path
    rows: int
    live_rows: np.ndarray  # rows that passed every GX rule, by position in the whole table
    live_hashes: np.ndarray  # their pHash, as uint64
    gx_result: dict


def judge_chunks(
    params: ValidateParams, download_dir: Path, facts: ManifestFacts, scratch: Path, docs_dir: Path, progress: bool
) -> Judged:
    """Pass 1: each chunk's metadata table through the GX suite, spilled to scratch/judged.parquet."""
    firsts = FirstCopies(scratch / "first_copies.sqlite")
    runner = SuiteRunner(params, docs_dir) if facts.ok else None
    spill = ParquetRowGroups(scratch / "judged.parquet")
    live_rows, live_hashes = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.uint64)]
    rows = 0
    try:
        with (
            InspectionCache(params.cache_dir, params.max_image_pixels) as cache,
            tqdm(total=facts.ok, desc="validate", unit="img", disable=not progress) as bar,
            inspection_pool(params.workers) as pool,  # started once, not per chunk
        ):
            for chunk in manifest_chunks(download_dir):
                ok = chunk[chunk["status"] == "ok"]
                files = ok.drop_duplicates("sha256")
                info = inspect_files(files, download_dir, cache, bar, pool)
                bar.update(len(ok) - len(files))
                table = metadata_table(ok, info, params, firsts, facts.captioned_sources)
                reasons = runner.run(table) if len(table) else []
                table["gx_reasons"] = pd.Series([",".join(r) for r in reasons], index=table.index, dtype="string")
                spill.add(table)
                passed = np.flatnonzero([not r for r in reasons]).astype(np.int64)
                live_rows.append(passed + rows)
                live_hashes.append(np.array([int(h, 16) for h in table["phash"].iloc[passed]], dtype=np.uint64))
                rows += len(table)
            cache.compact()  # this run's rows and those shards and earlier runs added, in one file again
        spill.finish()
    finally:
        firsts.close()
    gx_result = runner.finish() if runner else {"success": False, "results": [], "note": "no downloaded images"}
    return Judged(spill.path, rows, np.concatenate(live_rows), np.concatenate(live_hashes), gx_result)


def spilled_chunks(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """(first row's position, rows) for each row group of a spill file; an empty file gives one empty frame."""
    import pyarrow.parquet as pq

    spill = pq.ParquetFile(path)
    if not spill.num_row_groups:
        yield 0, spill.schema_arrow.empty_table().select(columns or spill.schema_arrow.names).to_pandas()
        return
    offset = 0
    for group in range(spill.num_row_groups):
        frame = spill.read_row_group(group, columns=columns).to_pandas()
        yield offset, frame
        offset += len(frame)


def read_rows(path: Path, columns: list[str], rows: np.ndarray) -> pd.DataFrame:
    """These rows (ascending positions) of a spill file, indexed by position, a row group at a time."""
    parts = []
    for offset, frame in spilled_chunks(path, columns):
        low, high = np.searchsorted(rows, [offset, offset + len(frame)])
        if high > low:
            picked = frame.iloc[rows[low:high] - offset]
            parts.append(picked.set_axis(rows[low:high]))
    return pd.concat(parts) if parts else pd.DataFrame(columns=columns)


def near_duplicate_verdicts(judged: Judged, max_distance: int) -> dict[int, tuple[str, str]]:
    """Among rows that pass every GX rule, one kept per near-duplicate group: {dropped row: (kept
    sha256, why)}. Only the groups' members are read back from the spill."""
    groups = hash_groups(judged.live_hashes, max_distance)
    if not groups:
        return {}
    members = np.sort(judged.live_rows[np.concatenate([np.asarray(g) for g in groups])])
    details = read_rows(judged.path, ["sha256", "url", "width", "height", "kb_per_pixel", "phash"], members)
    verdicts = {}
    for group in groups:
        candidates = [
            Candidate(int(row), d.sha256, d.url, int(d.width), int(d.height), float(d.kb_per_pixel), d.phash)
            for row, d in zip(judged.live_rows[group], details.loc[judged.live_rows[group]].itertuples(), strict=True)
        ]
        kept, notes = choose_kept(candidates)
        for row, note in notes.items():
            verdicts[row] = (kept.sha256, note)
    return verdicts


@dataclass
class Curation:
    rows: np.ndarray  # the rows scored (ascending)
    scores: np.ndarray
    keep: np.ndarray


def curation_verdicts(
    judged: Judged,
    dropped: dict[int, tuple[str, str]],
    download_dir: Path,
    params: ValidateParams,
    models: ModelsParams,
    progress: bool,
) -> Curation:
    """Aesthetic scores of the rows still accepted, and which of them curation keeps."""
    from components.validate.curate import aesthetic_scores, keep_mask

    rows = np.array([r for r in judged.live_rows.tolist() if r not in dropped], dtype=np.int64)
    if not len(rows):
        return Curation(rows, np.zeros(0), np.zeros(0, dtype=bool))
    # load_rgb applies rotation and conversion itself: the raw file is what is scored.
    paths = [str(download_dir / p) for p in read_rows(judged.path, ["path"], rows)["path"]]
    scores = aesthetic_scores(paths, models, params.curate.batch_size, progress)
    return Curation(rows, scores, keep_mask(scores, params.curate))


def image_paths(table: pd.DataFrame, write_dir: Path, final_dir: Path, max_pixels: int) -> list[str]:
    """Where training reads each accepted image: its converted copy (written to write_dir, read
    from final_dir once the outputs are in place) if it needs one, else the raw file."""
    paths = []
    for row in table.itertuples():
        orientation = None if pd.isna(row.exif_orientation) else int(row.exif_orientation)
        if row.accepted and needs_copy(row.mode, orientation):
            write_training_copy(Path(row.raw_path), write_dir / f"{row.sha256}.png", max_pixels)
            paths.append(str(final_dir / f"{row.sha256}.png"))
        else:
            paths.append(row.raw_path)
    return paths


@dataclass
class ValidateSummary:
    rows: int
    images: int
    accepted: int
    rejected: int
    per_rule: dict[str, int]
    report: Path


# Thumbnails in the report: a sample, so that the page (and the memory that builds it) does not grow
# with the data set; 20,000 images as cards made a 318 MB page and took 2 GB to build.
REPORT_CARDS_PER_RULE = 60
REPORT_ACCEPTED_CARDS = 120


def report_sample(rows: pd.DataFrame, limit: int, earlier: pd.DataFrame | None = None) -> pd.DataFrame:
    """At most `limit` rows, the same ones on every run: the first in the order of their file's
    stable hash (then position `_row`), so that the sample spreads over sources instead of showing
    the first list's head. `earlier` is the sample of the rows before these: over chunks it ends
    as the sample of the whole table."""
    rows = pd.concat([earlier, rows], ignore_index=True) if earlier is not None else rows.reset_index(drop=True)
    if len(rows) <= limit:
        return rows
    keys = pd.DataFrame({"hash": [stable_hash(sha) for sha in rows["sha256"]], "row": rows["_row"].to_numpy()})
    chosen = keys.sort_values(["hash", "row"], kind="stable").index[:limit]
    return rows.iloc[np.sort(chosen)]


def shown(count: int, total: int, where: str) -> str:
    if count >= total:
        return ""
    return f"<p>{count} of {total} shown, a fixed sample; every one is in <code>{where}</code>.</p>"


CARD_COLUMNS = ["_row", "sha256", "url", "raw_path", "decodable", "reasons", "near_duplicate_note"]
POLICY_COLUMNS = (("dpi_policy", "DPI"), ("frames_policy", "frames"))
HISTOGRAMS = {"width (px)": "width", "height (px)": "height", "DPI": "dpi", "KB per pixel": "kb_per_pixel"}


class ReportTotals:
    """What the report shows, added up a chunk at a time: counts, the policies' tallies, the
    histograms' values (a float each) and the thumbnail samples (a fixed number of rows)."""

    def __init__(self, params: ValidateParams) -> None:
        self.rules = rules_for(params)
        self.rows = self.distinct = self.accepted = 0
        self.per_rule: Counter[str] = Counter()
        self.policies: dict[tuple[str, str], list[int]] = {}
        self.values: dict[str, list[np.ndarray]] = {name: [] for name in HISTOGRAMS}
        self.samples: dict[str, pd.DataFrame] = {}

    def add(self, frame: pd.DataFrame, offset: int) -> None:
        accepted = frame["accepted"].to_numpy(dtype=bool)
        self.rows += len(frame)
        self.accepted += int(accepted.sum())
        self.distinct += int(frame["is_first_copy"].sum())
        self.per_rule.update(rule for rules in frame["reasons"] for rule in rules)
        for column, label in POLICY_COLUMNS:
            kind = frame[column].str.replace(r"^stated: .*", "stated in the file", regex=True)
            for value, accepted_here in zip(kind, accepted, strict=True):
                tally = self.policies.setdefault((label, value), [0, 0])
                tally[0] += 1
                tally[1] += int(accepted_here)
        for name, column in HISTOGRAMS.items():
            self.values[name].append(frame[column].astype("Float64").to_numpy(dtype=float, na_value=np.nan))
        cards = frame.assign(_row=offset + np.arange(len(frame))).reindex(columns=CARD_COLUMNS)
        for rule in self.rules:
            hit = cards[[rule.name in rules for rules in cards["reasons"]]]
            if len(hit) or rule.name in self.samples:
                self.samples[rule.name] = report_sample(hit, REPORT_CARDS_PER_RULE, self.samples.get(rule.name))
        self.samples[""] = report_sample(cards[accepted], REPORT_ACCEPTED_CARDS, self.samples.get(""))


def _write_report(path: Path, totals: ReportTotals, params: ValidateParams) -> Path:
    rules, rows, per_rule = totals.rules, totals.rows, totals.per_rule
    share = totals.accepted / rows if rows else 0.0
    counts = report.table_html(
        ["rule", "what it checks", "images failing", "share"],
        [(r.name, r.describe, per_rule.get(r.name, 0), f"{per_rule.get(r.name, 0) / max(rows, 1):.0%}") for r in rules],
    )
    by_label = sorted(totals.policies.items(), key=lambda item: (item[0][0] != "DPI", -item[1][0]))
    policies = report.table_html(["policy", "applied", "images", "accepted"], [(*k, *v) for k, v in by_label])
    overview = (
        f"<p>{rows} downloaded images ({totals.distinct} distinct files): "
        f"<span class='pass'>{totals.accepted} accepted</span> ({share:.0%}), "
        f"<span class='fail'>{rows - totals.accepted} rejected</span>. "
        "<a href='data_docs/index.html'>Great Expectations Data Docs</a></p>"
        + counts
        + "<p>How the DPI and animation policies decided each image (every image's own line is in its "
        "<code>dpi_policy</code> and <code>frames_policy</code> columns of accepted/rejected.parquet):</p>" + policies
    )
    hists = report.histograms(
        {name: np.concatenate(parts) for name, parts in totals.values.items()},
        lines={"DPI": params.min_dpi, "KB per pixel": params.min_kb_per_pixel},
    )
    sheets = []
    for rule in rules:
        hit = totals.samples.get(rule.name)
        if hit is None or hit.empty:
            continue
        cards = []
        for r in hit.itertuples():
            note = f" - {r.near_duplicate_note}" if rule.name == "near_duplicate" else ""
            cards.append(
                report.card(thumbnail(r.raw_path) if r.decodable else None, f"{r.url} ({', '.join(r.reasons)}){note}")
            )
        heading = f"{report.esc(rule.name)}: {report.esc(rule.describe)} ({per_rule[rule.name]})"
        sheets.append(
            f"<h3>{heading}</h3>{shown(len(cards), per_rule[rule.name], 'rejected.parquet')}{report.grid(cards)}"
        )
    accepted_cards = [report.card(thumbnail(r.raw_path), r.url) for r in totals.samples[""].itertuples()]
    accepted_html = shown(len(accepted_cards), totals.accepted, "accepted.parquet") + report.grid(accepted_cards)
    return report.write_html(
        path,
        "Easel validation report",
        [
            ("Summary", overview),
            ("Distributions", hists),
            ("Rejected images, by rule", "".join(sheets) or "<p>None.</p>"),
            ("Accepted images", accepted_html if accepted_cards else "<p>None.</p>"),
        ],
        intro="Rules and thresholds come from params.yaml <code>validate</code>. The checks run as a Great "
        "Expectations suite (gx_results.json, Data Docs); near-duplicates and curation follow it.",
    )


def write_outputs(
    judged: Judged,
    near: dict[int, tuple[str, str]],
    curation: Curation | None,
    download_dir: Path,
    params: ValidateParams,
    tmp: Path,
) -> ReportTotals:
    """Pass 2: each spilled chunk gets the verdicts decided over the whole set, then its accepted
    and rejected rows are appended to the outputs and its figures to the report's totals."""
    final_dir = Path(params.out_dir)
    accepted_out = ParquetRowGroups(tmp / "accepted.parquet")
    rejected_out = ParquetRowGroups(tmp / "rejected.parquet")
    totals = ReportTotals(params)
    for offset, frame in spilled_chunks(judged.path):
        rows = offset + np.arange(len(frame))
        reasons = [r.split(",") if r else [] for r in frame.pop("gx_reasons").fillna("")]
        if params.near_duplicates.enabled and judged.rows:
            kept = [near.get(int(row)) for row in rows]
            for i in np.flatnonzero([k is not None for k in kept]):
                reasons[i].append("near_duplicate")
            frame["near_duplicate_of"] = pd.Series([k and k[0] for k in kept], dtype="string")
            frame["near_duplicate_note"] = pd.Series([k and k[1] for k in kept], dtype="string")
        frame["raw_path"] = [str(download_dir / p) for p in frame["path"]]
        if curation is not None:
            at = np.searchsorted(curation.rows, rows)
            scored = at < len(curation.rows)
            scored[scored] = curation.rows[at[scored]] == rows[scored]
            score = np.full(len(frame), np.nan)
            score[scored] = curation.scores[at[scored]]
            frame["aesthetic_score"] = pd.Series(score, index=frame.index).astype("Float64")
            for i in np.flatnonzero(scored)[~curation.keep[at[scored]]]:
                reasons[i].append("curated_out")
        frame["reasons"] = reasons
        frame["accepted"] = pd.Series([not r for r in reasons], index=frame.index, dtype=bool)
        frame["image_path"] = image_paths(frame, tmp / "images", final_dir / "images", params.max_image_pixels)
        accepted_out.add(frame[frame["accepted"]].drop(columns=["reasons", "accepted"]).reset_index(drop=True))
        rejected_out.add(frame[~frame["accepted"]].drop(columns=["accepted"]).reset_index(drop=True))
        totals.add(frame, offset)
    accepted_out.finish()
    rejected_out.finish()
    return totals


def run_validate(
    params: ValidateParams,
    download_dir: Path,
    metrics_path: Path | None = None,
    progress: bool = True,
    models: ModelsParams | None = None,
) -> ValidateSummary:
    out_dir = Path(params.out_dir)
    if params.curate.enabled and models is None:
        raise EaselError("validate: curation is enabled but no models were given for the aesthetic scorer")
    facts = manifest_facts(download_dir, params)
    with ScratchDir("validate") as scratch, atomic_dir(out_dir) as tmp:
        judged = judge_chunks(params, download_dir, facts, scratch, tmp / "data_docs", progress)
        near = (
            near_duplicate_verdicts(judged, params.near_duplicates.max_distance)
            if (params.near_duplicates.enabled)
            else {}
        )
        curation = None
        if params.curate.enabled and judged.rows:
            curation = curation_verdicts(judged, near, download_dir, params, models, progress)
        totals = write_outputs(judged, near, curation, download_dir, params, tmp)
        atomic_write_json(tmp / "gx_results.json", judged.gx_result)
        _write_report(tmp / "report.html", totals, params)
    report_path = out_dir / "report.html"
    rows, accepted = totals.rows, totals.accepted
    per_rule = dict(totals.per_rule)
    summary = ValidateSummary(rows, totals.distinct, accepted, rows - accepted, per_rule, report_path)
    share = accepted / rows if rows else 0.0
    if metrics_path is not None:
        atomic_write_json(
            metrics_path,
            {
                "images": rows,
                "distinct_images": summary.images,
                "accepted": accepted,
                "rejected": rows - accepted,
                "accepted_share": round(share, 4),
                "rejected_by_rule": {r.name: per_rule.get(r.name, 0) for r in rules_for(params)},
            },
        )
    if accepted < params.min_accepted or share < params.min_accepted_share:
        raise EaselError(
            f"validate: only {accepted} of {rows} images passed ({share:.0%}; validate.min_accepted is "
            f"{params.min_accepted}, validate.min_accepted_share {params.min_accepted_share:.0%}); "
            f"see {report_path} for the reasons"
        )
    return summary
