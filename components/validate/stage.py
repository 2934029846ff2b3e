"""The validate stage: metadata table -> GX suite -> near-duplicates -> curation -> outputs.

One table row per downloaded manifest row (an image listed twice is two rows: the second is an
`exact_duplicate`); each distinct file is read and decoded once. Outputs in out_dir:
  accepted.parquet   every accepted image, with `image_path` to open for training
  rejected.parquet   every rejected image with `reasons` (every rule it failed)
  gx_results.json    Great Expectations' validation result; data_docs/ its HTML Data Docs
  report.html        the one-page summary a person reads
  images/            training-ready copies (rotated / converted), only where needed
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from components import report
from components.config import AssumeDpi, ModelsParams, ValidateParams
from components.errors import EaselError
from components.fsutil import atomic_dir, atomic_write_json, atomic_write_parquet
from components.images import thumbnail
from components.sharding import Shard, share, stable_hash
from components.validate.dedupe import Candidate, choose_kept, near_duplicate_groups
from components.validate.inspect import EMPTY_ROW, InspectionCache, inspect_cached
from components.validate.normalize import needs_copy, write_training_copy
from components.validate.rules import rules_for, run_suite

log = logging.getLogger(__name__)


def metadata_table(manifest: pd.DataFrame, download_dir: Path, params: ValidateParams, progress: bool) -> pd.DataFrame:
    """The table GX checks: one row per downloaded row, metadata read once per distinct file."""
    ok = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    columns = ["source", "row", "url", "sha256", "path", "bytes", *[c for c in ok.columns if c.startswith("src_")]]
    table = ok[columns].copy()
    firsts = table.drop_duplicates("sha256")
    rows = inspect_files(firsts, download_dir, params, progress)
    info = pd.DataFrame(
        [rows[sha] for sha in firsts["sha256"]], index=firsts["sha256"].to_numpy(), columns=list(EMPTY_ROW)
    )
    for column in info.columns:
        table[column] = table["sha256"].map(info[column])
    width, height = table["width"].astype("Float64"), table["height"].astype("Float64")
    table["width"], table["height"] = width.astype("Int64"), height.astype("Int64")
    table["short_side"] = np.minimum(width, height).astype("Int64")
    table["long_side"] = np.maximum(width, height).astype("Int64")
    table["aspect_ratio"] = (width / height).astype("Float64")
    table["kb_per_pixel"] = (table["bytes"].astype("Float64") / 1024 / (width * height)).astype("Float64")
    table["dpi"] = table["dpi"].astype("Float64")
    assumed = params.missing_dpi.assume if isinstance(params.missing_dpi, AssumeDpi) else None
    table["dpi_assumed"] = table["dpi"].isna() & table["header_read"].astype(bool) & (assumed is not None)
    table["dpi_effective"] = table["dpi"].fillna(assumed) if assumed is not None else table["dpi"]
    table["dpi_policy"] = dpi_policies(table, params)
    table["frames_policy"] = frames_policies(table, params)
    caption_col = f"src_{params.caption_column}" if params.caption_column else None
    if caption_col and caption_col in table.columns:
        text = table[caption_col].astype("string").str.strip()
        table["caption"] = text.mask(text == "")
        # A source "has" captions if any of its rows filled the column.
        table["caption_expected"] = table.groupby("source")[caption_col].transform(lambda s: s.notna().any())
    else:
        table["caption"] = pd.Series(pd.NA, index=table.index, dtype="string")
        table["caption_expected"] = False
    first_url = table.drop_duplicates("sha256").set_index("sha256")["url"]
    table["is_first_copy"] = ~table["sha256"].duplicated()
    table["duplicate_of"] = table["sha256"].map(first_url).where(~table["is_first_copy"]).astype("string")
    return table


def inspect_files(files: pd.DataFrame, download_dir: Path, params: ValidateParams, progress: bool) -> dict[str, dict]:
    """{sha256: metadata row} of distinct files (columns sha256, path), through the inspection cache."""
    cache = InspectionCache(params.cache_dir, params.max_image_pixels)
    bar = tqdm(total=len(files), desc="validate", unit="img", disable=not progress)
    pairs = [(sha, str(download_dir / path)) for sha, path in zip(files["sha256"], files["path"], strict=True)]
    rows = inspect_cached(pairs, cache, params.workers, bar.update)
    bar.close()
    return rows


def read_manifest(download_dir: Path, params: ValidateParams) -> pd.DataFrame:
    manifest_path = download_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise EaselError(f"validate: {manifest_path} not found; run the download stage first")
    try:
        manifest = pd.read_parquet(manifest_path)
    except (OSError, ValueError) as exc:
        raise EaselError(f"validate: {manifest_path}: cannot be read ({str(exc).splitlines()[0]})") from None
    if params.min_accepted and not (manifest.get("status", pd.Series(dtype=str)) == "ok").any():
        # Nothing to judge: writing empty accepted/rejected sets would replace the last good ones.
        raise EaselError(
            f"validate: {manifest_path} lists no downloaded images ({len(manifest)} rows, none ok); "
            "fix the download first (validate.min_accepted: 0 allows an empty set)"
        )
    return manifest


def inspect_shard(params: ValidateParams, download_dir: Path, shard: Shard, progress: bool = True) -> tuple[int, int]:
    """Shard K/N of the stage's decoding: inspects this shard's distinct files (by sha256) into the
    inspection cache and writes no output. Returns (files in the shard, files inspected now)."""
    mine = shard_share(read_manifest(download_dir, params), shard)
    cache = InspectionCache(params.cache_dir, params.max_image_pixels)
    before = sum(cache.get(sha) is None for sha in mine["sha256"])
    inspect_files(mine, download_dir, params, progress)
    return len(mine), before


def shard_share(manifest: pd.DataFrame, shard: Shard) -> pd.DataFrame:
    """Shard K/N's distinct downloaded files (by sha256): the manifest rows it inspects."""
    ok = manifest[manifest["status"] == "ok"].drop_duplicates("sha256")
    return ok[ok["sha256"].isin(share(list(ok["sha256"]), shard, key=str))]


def shard_files(params: ValidateParams, download_dir: Path, root: Path, shard: Shard) -> list[str]:
    """The image files (relative to `root`, a shard's folder holding the stage's other inputs) that
    shard K/N reads: its share of the distinct files not in the inspection cache yet."""
    cache = InspectionCache(root / params.cache_dir, params.max_image_pixels)
    mine = shard_share(read_manifest(root / download_dir, params), shard)
    pairs = zip(mine["sha256"], mine["path"], strict=True)
    return [(download_dir / path).as_posix() for sha, path in pairs if cache.get(sha) is None]


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


def mark_near_duplicates(table: pd.DataFrame, reasons: list[list[str]], max_distance: int) -> None:
    """Among images that pass every other rule, keep one per near-duplicate group; record why."""
    live = [i for i, r in enumerate(reasons) if not r]
    groups = near_duplicate_groups([table.at[i, "phash"] for i in live], max_distance)
    table["near_duplicate_of"] = pd.Series(pd.NA, index=table.index, dtype="string")
    table["near_duplicate_note"] = pd.Series(pd.NA, index=table.index, dtype="string")
    for group in groups:
        members = [
            Candidate(
                i,
                table.at[i, "sha256"],
                table.at[i, "url"],
                int(table.at[i, "width"]),
                int(table.at[i, "height"]),
                float(table.at[i, "kb_per_pixel"]),
                table.at[i, "phash"],
            )
            for i in (live[g] for g in group)
        ]
        kept, notes = choose_kept(members)
        for index, note in notes.items():
            reasons[index].append("near_duplicate")
            table.at[index, "near_duplicate_of"] = kept.sha256
            table.at[index, "near_duplicate_note"] = note


def curate(
    table: pd.DataFrame, reasons: list[list[str]], params: ValidateParams, models: ModelsParams, progress: bool
) -> None:
    from components.validate.curate import aesthetic_scores, keep_mask

    live = [i for i, r in enumerate(reasons) if not r]
    table["aesthetic_score"] = pd.Series(np.nan, index=table.index, dtype="Float64")
    if not live:
        return
    paths = [table.at[i, "raw_path"] for i in live]  # load_rgb applies rotation and conversion itself
    scores = aesthetic_scores(paths, models, params.curate.batch_size, progress)
    keep = keep_mask(scores, params.curate)
    for position, index in enumerate(live):
        table.at[index, "aesthetic_score"] = float(scores[position])
        if not keep[position]:
            reasons[index].append("curated_out")


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


def report_sample(rows: pd.DataFrame, limit: int) -> pd.DataFrame:
    """At most `limit` rows, the same ones on every run: the first in the order of their file's
    stable hash, so that the sample spreads over sources instead of showing the first list's head."""
    if len(rows) <= limit:
        return rows
    order = np.argsort([stable_hash(sha) for sha in rows["sha256"]], kind="stable")
    return rows.iloc[np.sort(order[:limit])]


def shown(count: int, total: int, where: str) -> str:
    if count >= total:
        return ""
    return f"<p>{count} of {total} shown, a fixed sample; every one is in <code>{where}</code>.</p>"


def _write_report(path: Path, table: pd.DataFrame, params: ValidateParams, per_rule: dict[str, int]) -> Path:
    rules = rules_for(params)
    accepted = table[table["accepted"]]
    rejected = table[~table["accepted"]]
    share = len(accepted) / len(table) if len(table) else 0.0
    counts = report.table_html(
        ["rule", "what it checks", "images failing", "share"],
        [
            (r.name, r.describe, per_rule.get(r.name, 0), f"{per_rule.get(r.name, 0) / max(len(table), 1):.0%}")
            for r in rules
        ],
    )
    rows = []
    for column, label in (("dpi_policy", "DPI"), ("frames_policy", "frames")):
        kind = table[column].str.replace(r"^stated: .*", "stated in the file", regex=True)
        for value, n in kind.value_counts().items():
            rows.append((label, value, n, int((kind[table["accepted"]] == value).sum())))
    policies = report.table_html(["policy", "applied", "images", "accepted"], rows)
    overview = (
        f"<p>{len(table)} downloaded images ({table['sha256'].nunique()} distinct files): "
        f"<span class='pass'>{len(accepted)} accepted</span> ({share:.0%}), "
        f"<span class='fail'>{len(rejected)} rejected</span>. "
        "<a href='data_docs/index.html'>Great Expectations Data Docs</a></p>"
        + counts
        + "<p>How the DPI and animation policies decided each image (every image's own line is in its "
        "<code>dpi_policy</code> and <code>frames_policy</code> columns of accepted/rejected.parquet):</p>" + policies
    )
    hists = report.histograms(
        {
            "width (px)": table["width"].astype("float").tolist(),
            "height (px)": table["height"].astype("float").tolist(),
            "DPI": table["dpi"].astype("float").tolist(),
            "KB per pixel": table["kb_per_pixel"].astype("float").tolist(),
        },
        lines={"DPI": params.min_dpi, "KB per pixel": params.min_kb_per_pixel},
    )
    sheets = []
    for rule in rules:
        hit = rejected[rejected["reasons"].apply(lambda rs, name=rule.name: name in rs)]
        if hit.empty:
            continue
        cards = []
        for r in report_sample(hit, REPORT_CARDS_PER_RULE).itertuples():
            note = f" - {r.near_duplicate_note}" if rule.name == "near_duplicate" else ""
            cards.append(
                report.card(thumbnail(r.raw_path) if r.decodable else None, f"{r.url} ({', '.join(r.reasons)}){note}")
            )
        heading = f"{report.esc(rule.name)}: {report.esc(rule.describe)} ({len(hit)})"
        sheets.append(f"<h3>{heading}</h3>{shown(len(cards), len(hit), 'rejected.parquet')}{report.grid(cards)}")
    accepted_cards = [
        report.card(thumbnail(r.raw_path), r.url) for r in report_sample(accepted, REPORT_ACCEPTED_CARDS).itertuples()
    ]
    accepted_html = shown(len(accepted_cards), len(accepted), "accepted.parquet") + report.grid(accepted_cards)
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
    manifest = read_manifest(download_dir, params)
    table = metadata_table(manifest, download_dir, params, progress)
    with atomic_dir(out_dir) as tmp:
        if table.empty:
            reasons: list[list[str]] = []
            gx_result: dict = {"success": False, "results": [], "note": "no downloaded images"}
        else:
            reasons, gx_result = run_suite(table, params, tmp / "data_docs")
            if params.near_duplicates.enabled:
                mark_near_duplicates(table, reasons, params.near_duplicates.max_distance)
        table["raw_path"] = [str(download_dir / p) for p in table["path"]]
        if params.curate.enabled and len(table):
            curate(table, reasons, params, models, progress)
        table["reasons"] = reasons
        table["accepted"] = pd.Series([not r for r in reasons], index=table.index, dtype=bool)
        table["image_path"] = image_paths(table, tmp / "images", out_dir / "images", params.max_image_pixels)
        per_rule = dict(Counter(rule for rs in reasons for rule in rs))
        accepted = table[table["accepted"]].drop(columns=["reasons", "accepted"]).reset_index(drop=True)
        rejected = table[~table["accepted"]].drop(columns=["accepted"]).reset_index(drop=True)
        atomic_write_parquet(tmp / "accepted.parquet", accepted)
        atomic_write_parquet(tmp / "rejected.parquet", rejected)
        atomic_write_json(tmp / "gx_results.json", gx_result)
        _write_report(tmp / "report.html", table, params, per_rule)
    report_path = out_dir / "report.html"
    summary = ValidateSummary(
        len(table),
        int(table["sha256"].nunique()) if len(table) else 0,
        len(accepted),
        len(rejected),
        per_rule,
        report_path,
    )
    share = len(accepted) / len(table) if len(table) else 0.0
    if metrics_path is not None:
        atomic_write_json(
            metrics_path,
            {
                "images": len(table),
                "distinct_images": summary.images,
                "accepted": len(accepted),
                "rejected": len(rejected),
                "accepted_share": round(share, 4),
                "rejected_by_rule": {r.name: per_rule.get(r.name, 0) for r in rules_for(params)},
            },
        )
    if len(accepted) < params.min_accepted or share < params.min_accepted_share:
        raise EaselError(
            f"validate: only {len(accepted)} of {len(table)} images passed ({share:.0%}; validate.min_accepted is "
            f"{params.min_accepted}, validate.min_accepted_share {params.min_accepted_share:.0%}); "
            f"see {report_path} for the reasons"
        )
    return summary
