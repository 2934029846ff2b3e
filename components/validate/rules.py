"""The validation rules as a Great Expectations (GX Core 1.x) suite, and their verdicts per image.

Each expectation carries its rule name in `meta`, so GX's `unexpected_index_list` turns into the
list of rules each image failed. GX treats nulls as passing a between-check, so a missing DPI
is a rule of its own (`dpi_missing`), applied by the `missing_dpi` policy.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.config import AssumeDpi, ValidateParams
from components.plumbing.errors import EaselError


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


class SuiteRunner:
    """The GX suite, set up once and run over the metadata table a chunk at a time.

    Each chunk is one GX validation (named by its rows in the Data Docs); `result` folds them into
    one result in GX's own shape, with row indices counted over the whole table."""

    def __init__(self, params: ValidateParams, docs_dir: Path | None = None) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.order = [r.name for r in rules_for(params)]
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch_definition = (
            self.context.data_sources.add_pandas("images")
            .add_dataframe_asset("image_metadata")
            .add_batch_definition_whole_dataframe("all_images")
        )
        suite = self.context.suites.add(build_suite(params))
        validation = self.context.validation_definitions.add(
            gx.ValidationDefinition(data=batch_definition, suite=suite, name="easel_validate")
        )
        self.docs = docs_dir is not None
        if docs_dir is not None:
            self.context.add_data_docs_site(
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
        # Data Docs are built once at the end (`finish`): rebuilding the site after every chunk
        # re-renders every earlier chunk's result.
        self.checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name="easel_validate",
                validation_definitions=[validation],
                actions=[],
                result_format={"result_format": "COMPLETE"},
            )
        )
        self.rows = 0
        self.merged: dict | None = None

    def run(self, table: pd.DataFrame) -> list[list[str]]:
        """Each row's failed rules, in reporting order, for the next chunk of the table."""
        from great_expectations.core.run_identifier import RunIdentifier

        # GX reports failing rows by index label; a plain RangeIndex makes those positions.
        frame = table.reset_index(drop=True)
        run_id = RunIdentifier(run_name=f"rows {self.rows}-{self.rows + len(frame) - 1}")
        results = self.checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id).run_results
        result = next(iter(results.values()))
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
        self.merged = fold_results(self.merged, result.to_json_dict(), self.rows)
        self.rows += len(frame)
        return [sorted(r, key=self.order.index) for r in reasons]

    def finish(self) -> dict:
        """Build the Data Docs (when asked for) and return the whole table's result."""
        if self.docs:
            self.context.build_data_docs(site_names=["easel"])
        return self.merged


PARTIAL_LIST = 20  # GX's own length for its partial_unexpected_* lists


def fold_results(merged: dict | None, chunk: dict, offset: int) -> dict:
    """GX's result for the rows so far plus the next chunk (whose row indices start at `offset`):
    counts add up, percentages are recomputed, lists are joined, success needs every chunk."""
    if merged is None:
        merged = json.loads(json.dumps(chunk))
        merged["meta"]["easel_chunks"] = 0
        for res in merged["results"]:
            _shift_indices(res["result"], offset)
    else:
        for res, new in zip(merged["results"], chunk["results"], strict=True):
            res["success"] = res["success"] and new["success"]
            total, part = res["result"], dict(new["result"])
            _shift_indices(part, offset)
            for key in ("element_count", "unexpected_count", "missing_count"):
                if key in total:
                    total[key] += part.get(key, 0)
            for key in ("unexpected_list", "unexpected_index_list"):
                if key in total:
                    total[key] = total[key] + part.get(key, [])
            for key in ("partial_unexpected_list", "partial_unexpected_index_list"):
                if key in total:
                    total[key] = (total[key] + part.get(key, []))[:PARTIAL_LIST]
            if "partial_unexpected_counts" in total:
                counts = Counter()
                for item in total["partial_unexpected_counts"] + part.get("partial_unexpected_counts", []):
                    counts[json.dumps(item["value"])] += item["count"]
                total["partial_unexpected_counts"] = [
                    {"value": json.loads(value), "count": n} for value, n in counts.most_common(PARTIAL_LIST)
                ]
            _percentages(total)
    merged["meta"]["easel_chunks"] += 1
    merged["success"] = all(res["success"] for res in merged["results"])
    good = sum(res["success"] for res in merged["results"])
    evaluated = len(merged["results"])
    merged["statistics"] = {
        "evaluated_expectations": evaluated,
        "successful_expectations": good,
        "unsuccessful_expectations": evaluated - good,
        "success_percent": 100 * good / evaluated if evaluated else None,
    }
    return merged


def _shift_indices(result: dict, offset: int) -> None:
    for key in ("unexpected_index_list", "partial_unexpected_index_list"):
        if key in result:
            result[key] = [int(i) + offset for i in result[key]]
    _index_query(result)


def _index_query(result: dict) -> None:
    """GX's pandas query for the failing rows, kept in step with the (shifted, joined) index list."""
    if "unexpected_index_query" in result:
        result["unexpected_index_query"] = f"df.filter(items={result.get('unexpected_index_list', [])}, axis=0)"


def _percentages(result: dict) -> None:
    if "element_count" not in result or "unexpected_count" not in result:
        return
    elements, unexpected, missing = result["element_count"], result["unexpected_count"], result.get("missing_count", 0)
    present = elements - missing
    percent = unexpected / present * 100 if present else None  # in the order GX computes it
    result["unexpected_percent"] = percent
    if "unexpected_percent_nonmissing" in result:
        result["unexpected_percent_nonmissing"] = percent
    if "unexpected_percent_total" in result:
        result["unexpected_percent_total"] = unexpected / elements * 100 if elements else None
    if "missing_percent" in result:
        result["missing_percent"] = missing / elements * 100 if elements else None
    _index_query(result)


def run_suite(
    table: pd.DataFrame, params: ValidateParams, docs_dir: Path | None = None
) -> tuple[list[list[str]], dict]:
    """Run the suite over a whole table (and build Data Docs into docs_dir); returns each row's
    failed rules and GX's result."""
    runner = SuiteRunner(params, docs_dir)
    reasons = runner.run(table)
    return reasons, runner.finish()
