"""The validation rules as a Great Expectations (GX Core 1.x) suite, and their verdicts per image.

Each expectation carries its rule name in `meta`, so GX's `unexpected_index_list` turns into the
list of rules each image failed. GX treats nulls as passing a between-check, so a missing DPI
is a rule of its own (`dpi_missing`), applied by the `missing_dpi` policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.config import AssumeDpi, ValidateParams
from components.errors import EaselError


@dataclass(frozen=True)
class Rule:
    name: str
    describe: str


def rules_for(params: ValidateParams) -> list[Rule]:
    """Every rule for these params, in reporting order (GX rules first, then dedupe and curation)."""
    p = params
    rules = [
        Rule("decodable", "the file decodes completely (no truncation, no decompression bomb)"),
        Rule("format", f"format is one of {', '.join(p.allowed_formats)}"),
        Rule("mode", f"colour mode is one of {', '.join(p.allowed_modes)}"),
    ]
    if not p.allow_animated:
        rules.append(Rule("animated", "a still image, not an animation"))
    rules += [
        Rule("short_side", f"shorter side in [{p.min_short_side}, {p.max_short_side}] px"),
        Rule("long_side", f"longer side in [{p.min_long_side}, {p.max_long_side}] px"),
        Rule("aspect_ratio", f"width / height in [{p.min_aspect_ratio:g}, {p.max_aspect_ratio:g}]"),
        Rule(
            "dpi",
            f"DPI >= {p.min_dpi:g}"
            + (f" (missing DPI taken as {p.missing_dpi.assume:g})" if isinstance(p.missing_dpi, AssumeDpi) else ""),
        ),
    ]
    if p.missing_dpi == "reject":
        rules.append(Rule("dpi_missing", "the file states its DPI (missing_dpi: reject)"))
    rules.append(Rule("kb_per_pixel", f"file KB per pixel >= {p.min_kb_per_pixel:g}"))
    if p.caption_column:
        rules.append(Rule("caption_missing", f"a caption, when the source has a {p.caption_column!r} column"))
    rules.append(Rule("exact_duplicate", "not byte-identical to an earlier image (sha256)"))
    if p.near_duplicates.enabled:
        rules.append(Rule("near_duplicate", f"not within {p.near_duplicates.max_distance} pHash bits of a kept image"))
    if p.curate.enabled:
        rules.append(Rule("curated_out", "among the images kept by aesthetic curation"))
    return rules


def build_suite(params: ValidateParams):
    """The GX expectation suite for these thresholds; each expectation carries its rule name."""
    import great_expectations as gx

    E = gx.expectations
    p = params
    # Only where the header was read: an unreadable file fails `decodable` and nothing else.
    header = {"row_condition": "header_read==True", "condition_parser": "pandas"}
    makers = {
        "decodable": lambda m: E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], meta=m),
        "format": lambda m: E.ExpectColumnValuesToBeInSet(
            column="format", value_set=p.allowed_formats, meta=m, **header
        ),
        "mode": lambda m: E.ExpectColumnValuesToBeInSet(column="mode", value_set=p.allowed_modes, meta=m, **header),
        "animated": lambda m: E.ExpectColumnValuesToBeInSet(column="animated", value_set=[False], meta=m),
        "short_side": lambda m: E.ExpectColumnValuesToBeBetween(
            column="short_side", min_value=p.min_short_side, max_value=p.max_short_side, meta=m
        ),
        "long_side": lambda m: E.ExpectColumnValuesToBeBetween(
            column="long_side", min_value=p.min_long_side, max_value=p.max_long_side, meta=m
        ),
        "aspect_ratio": lambda m: E.ExpectColumnValuesToBeBetween(
            column="aspect_ratio", min_value=p.min_aspect_ratio, max_value=p.max_aspect_ratio, meta=m
        ),
        "dpi": lambda m: E.ExpectColumnValuesToBeBetween(column="dpi_effective", min_value=p.min_dpi, meta=m),
        "dpi_missing": lambda m: E.ExpectColumnValuesToNotBeNull(column="dpi", meta=m, **header),
        "kb_per_pixel": lambda m: E.ExpectColumnValuesToBeBetween(
            column="kb_per_pixel", min_value=p.min_kb_per_pixel, meta=m
        ),
        "caption_missing": lambda m: E.ExpectColumnValuesToNotBeNull(
            column="caption", meta=m, row_condition="caption_expected==True", condition_parser="pandas"
        ),
        # The first copy of each sha256 has no duplicate_of; every later copy names it.
        "exact_duplicate": lambda m: E.ExpectColumnValuesToBeNull(column="duplicate_of", meta=m),
    }
    suite = gx.ExpectationSuite(name="easel_image_rules")
    for rule in rules_for(params):
        if rule.name in makers:
            suite.add_expectation(makers[rule.name]({"rule": rule.name, "describe": rule.describe}))
    # An integrity check on the table itself: among first copies, sha256 is unique.
    suite.add_expectation(
        E.ExpectColumnValuesToBeUnique(
            column="sha256",
            row_condition="is_first_copy==True",
            condition_parser="pandas",
            meta={"rule": "table_integrity", "describe": "sha256 unique among first copies"},
        )
    )
    return suite


def run_suite(
    table: pd.DataFrame, params: ValidateParams, docs_dir: Path | None = None
) -> tuple[list[list[str]], dict]:
    """Run the suite (and build Data Docs into docs_dir); returns each row's failed rules and GX's result."""
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
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="easel",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),  # GX insists on an absolute path
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["easel"]))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="easel_validate",
            validation_definitions=[validation],
            actions=actions,
            result_format={"result_format": "COMPLETE"},
        )
    )
    # GX reports failing rows by index label; a plain RangeIndex makes those positions.
    frame = table.reset_index(drop=True)
    result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
    reasons: list[list[str]] = [[] for _ in range(len(frame))]
    for res in result.results:
        rule = res.expectation_config.meta["rule"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise EaselError(f"validate: GX rule {rule!r} raised: {res.exception_info.get('exception_message')}")
        if rule == "table_integrity":
            if not res.success:
                raise EaselError("validate: internal error: two first copies share a sha256")
            continue
        for index in res.result.get("unexpected_index_list") or []:
            reasons[int(index)].append(rule)
    order = [r.name for r in rules_for(params)]
    return [sorted(r, key=order.index) for r in reasons], result.to_json_dict()
