"""Validate stage: an image metadata table, a Great Expectations suite over it, and the verdicts.

The guide's cleaning rules, thresholds from params.yaml `validate`:
  width and height in [512, 1024] px, DPI >= 96, file KB per pixel >= 0.0005, decodable.
Metadata comes from image headers (no full decode for size, mode or DPI) plus one verified
decode per image to catch truncated files. Every rejected image lists every rule it failed.
GX treats nulls as passing a between-check, so a missing DPI has a rule of its own (`dpi_missing`)
governed by `missing_dpi: reject | accept`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from components import report
from components.config import ValidateParams
from components.errors import EaselError
from components.fsutil import atomic_write_json, atomic_write_parquet
from components.images import read_header, thumbnail, verify_decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    name: str
    column: str
    describe: str


def rules_for(params: ValidateParams) -> list[Rule]:
    rules = [
        Rule("decodable", "decodable", "the file decodes completely"),
        Rule("width", "width", f"width in [{params.min_width}, {params.max_width}] px"),
        Rule("height", "height", f"height in [{params.min_height}, {params.max_height}] px"),
        Rule("dpi", "dpi", f"DPI >= {params.min_dpi:g} (where the file states one)"),
        Rule("kb_per_pixel", "kb_per_pixel", f"file KB per pixel >= {params.min_kb_per_pixel:g}"),
    ]
    if params.missing_dpi == "reject":
        rules.insert(4, Rule("dpi_missing", "dpi", "the file states its DPI (missing_dpi: reject)"))
    return rules


def _metadata_row(sha: str, path: Path, size: int, max_pixels: int) -> dict:
    header = read_header(path, max_pixels)
    decode_error = header.error or verify_decode(path, max_pixels)
    pixels = (header.width or 0) * (header.height or 0)
    return {
        "sha256": sha,
        "format": header.format,
        "mode": header.mode,
        "width": header.width,
        "height": header.height,
        "dpi": header.dpi,
        "bytes": size,
        "kb_per_pixel": (size / 1024 / pixels) if pixels else None,
        "header_read": header.error is None,
        "decodable": decode_error is None,
        "decode_error": decode_error,
    }


def image_metadata(manifest: pd.DataFrame, download_dir: Path, max_pixels: int, progress: bool = True) -> pd.DataFrame:
    """One row per distinct downloaded image (by sha256), with the URLs that led to it."""
    ok = manifest[manifest["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=["sha256", "path", "url", "source", "n_urls"])
    firsts = ok.drop_duplicates("sha256", keep="first").reset_index(drop=True)
    n_urls = ok.groupby("sha256")["url"].nunique()
    rows = []
    for record in tqdm(firsts.itertuples(), total=len(firsts), desc="validate", unit="img", disable=not progress):
        path = download_dir / record.path
        row = {"path": record.path, "url": record.url, "source": record.source}
        row |= _metadata_row(record.sha256, path, os.path.getsize(path), max_pixels)
        rows.append(row)
    table = pd.DataFrame(rows)
    table["n_urls"] = table["sha256"].map(n_urls).astype(int)
    for col in ("width", "height"):
        table[col] = table[col].astype("Int64")
    for col in ("dpi", "kb_per_pixel"):
        table[col] = table[col].astype("Float64")
    # Source columns (title, caption, ...) travel with the image.
    extra = [c for c in firsts.columns if c.startswith("src_")]
    return pd.concat([table, firsts[extra]], axis=1)


def build_suite(params: ValidateParams):
    """The GX expectation suite for these thresholds; each expectation carries its rule name."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="easel_image_rules")
    for rule in rules_for(params):
        meta = {"rule": rule.name, "describe": rule.describe}
        if rule.name == "decodable":
            exp = E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], meta=meta)
        elif rule.name == "width":
            exp = E.ExpectColumnValuesToBeBetween(
                column="width", min_value=params.min_width, max_value=params.max_width, meta=meta
            )
        elif rule.name == "height":
            exp = E.ExpectColumnValuesToBeBetween(
                column="height", min_value=params.min_height, max_value=params.max_height, meta=meta
            )
        elif rule.name == "dpi":
            exp = E.ExpectColumnValuesToBeBetween(column="dpi", min_value=params.min_dpi, meta=meta)
        elif rule.name == "dpi_missing":
            # Only where the header was read: an unreadable file already fails `decodable`.
            exp = E.ExpectColumnValuesToNotBeNull(
                column="dpi", row_condition="header_read==True", condition_parser="pandas", meta=meta
            )
        else:
            exp = E.ExpectColumnValuesToBeBetween(column="kb_per_pixel", min_value=params.min_kb_per_pixel, meta=meta)
        suite.add_expectation(exp)
    return suite


def run_suite(table: pd.DataFrame, params: ValidateParams) -> tuple[list[list[str]], dict]:
    """Run the suite over the table; returns each row's failed rules and GX's result as JSON."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("images")
        .add_dataframe_asset("image_metadata")
        .add_batch_definition_whole_dataframe("all_images")
    )
    suite = context.suites.add(build_suite(params))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(data=batch_definition, suite=suite, name="easel_validate")
    )
    # GX reports failing rows by index label; a plain RangeIndex makes those positions.
    frame = table.reset_index(drop=True)
    result = validation.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    reasons: list[list[str]] = [[] for _ in range(len(frame))]
    for res in result.results:
        rule = res.expectation_config.meta["rule"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise EaselError(f"validate: GX rule {rule!r} raised: {res.exception_info.get('exception_message')}")
        for index in res.result.get("unexpected_index_list") or []:
            reasons[int(index)].append(rule)
    order = [r.name for r in rules_for(params)]
    return [sorted(r, key=order.index) for r in reasons], result.to_json_dict()


@dataclass
class ValidateSummary:
    images: int
    accepted: int
    rejected: int
    per_rule: dict[str, int]
    report: Path


def _write_report(
    path: Path, table: pd.DataFrame, params: ValidateParams, per_rule: dict[str, int], download_dir: Path
) -> Path:
    rules = rules_for(params)
    accepted = table[table["accepted"]]
    rejected = table[~table["accepted"]]
    counts = report.table_html(
        ["rule", "what it checks", "images failing"],
        [(r.name, r.describe, per_rule.get(r.name, 0)) for r in rules],
    )
    overview = (
        f"<p>{len(table)} distinct images: <span class='pass'>{len(accepted)} accepted</span>, "
        f"<span class='fail'>{len(rejected)} rejected</span>.</p>{counts}"
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
        cards = [
            report.card(thumbnail(download_dir / r.path), f"{r.url} ({', '.join(r.reasons)})") for r in hit.itertuples()
        ]
        sheets.append(f"<h3>{report.esc(rule.name)}: {report.esc(rule.describe)}</h3>{report.grid(cards)}")
    accepted_cards = [report.card(thumbnail(download_dir / r.path), r.url) for r in accepted.itertuples()]
    return report.write_html(
        path,
        "Easel validation report",
        [
            ("Summary", overview),
            ("Distributions", hists),
            ("Rejected images, by rule", "".join(sheets) or "<p>None.</p>"),
            ("Accepted images", report.grid(accepted_cards) or "<p>None.</p>"),
        ],
        intro="Rules and thresholds come from params.yaml <code>validate</code>; the checks run as a "
        "Great Expectations suite (results in gx_results.json).",
    )


def run_validate(
    params: ValidateParams,
    download_dir: Path,
    metrics_path: Path | None = None,
    progress: bool = True,
) -> ValidateSummary:
    out_dir = Path(params.out_dir)
    manifest_path = download_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise EaselError(f"validate: {manifest_path} not found; run the download stage first")
    manifest = pd.read_parquet(manifest_path)
    table = image_metadata(manifest, download_dir, params.max_image_pixels, progress)
    if table.empty:
        reasons: list[list[str]] = []
        gx_result: dict = {"success": False, "results": [], "note": "no downloaded images"}
        table = table.assign(reasons=[], accepted=[])
    else:
        reasons, gx_result = run_suite(table, params)
        table = table.assign(reasons=reasons, accepted=[not r for r in reasons])
    per_rule = Counter(rule for rs in reasons for rule in rs)
    accepted = table[table["accepted"]].drop(columns=["reasons", "accepted"]).reset_index(drop=True)
    rejected = table[~table["accepted"]].drop(columns=["accepted"]).reset_index(drop=True)
    atomic_write_parquet(out_dir / "accepted.parquet", accepted)
    atomic_write_parquet(out_dir / "rejected.parquet", rejected)
    atomic_write_json(out_dir / "gx_results.json", gx_result)
    report_path = _write_report(out_dir / "report.html", table, params, per_rule, download_dir)
    summary = ValidateSummary(len(table), len(accepted), len(rejected), dict(per_rule), report_path)
    if metrics_path is not None:
        share = len(accepted) / len(table) if len(table) else 0.0
        atomic_write_json(
            metrics_path,
            {
                "images": len(table),
                "accepted": len(accepted),
                "rejected": len(rejected),
                "accepted_share": round(share, 4),
                "rejected_by_rule": {r.name: per_rule.get(r.name, 0) for r in rules_for(params)},
            },
        )
    if len(accepted) < params.min_accepted:
        raise EaselError(
            f"validate: only {len(accepted)} of {len(table)} images passed (validate.min_accepted is "
            f"{params.min_accepted}); see {report_path} for the reasons"
        )
    log.info("validate: %s", json.dumps({"accepted": len(accepted), "rejected": len(rejected)}))
    return summary
