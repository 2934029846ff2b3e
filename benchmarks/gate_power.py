"""What the default prompt set can resolve: the gate's power and minimum detectable margins.

    .venv/bin/python -m benchmarks.gate_power [--summary data/evaluate/summary.json]

For the number of prompts in the default prompt set (or `--prompts N`), and a range of spreads of
the per-prompt paired differences, prints the smallest non-inferiority margin detectable at the
gate's power, the power at the sdxl profile's margins, and the prompts a decision at those margins
needs. With `--summary`, also the spreads an evaluation actually measured. The figures are the
gate's own functions (components.evaluate.stats), not a re-derivation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.config import load_params
from components.evaluate.stats import min_detectable_margin, noninferiority_power, one_sided_alpha, prompts_needed
from components.prompts import load_prompt_set
from components.report import fmt, table_md

SPREADS = {"aesthetic": (0.05, 0.1, 0.15, 0.2, 0.25), "clip_score": (0.005, 0.01, 0.02, 0.03)}


def rows_for(metric: str, spreads, n: int, margin: float, alpha: float, power: float, floor: int) -> list[tuple]:
    """One row per spread; "prompts needed" counts the gate's min_prompts floor too, as the gate does."""
    return [
        (
            metric,
            fmt(sd),
            n,
            fmt(min_detectable_margin(sd, n, alpha, power), 3),
            fmt(margin),
            fmt(noninferiority_power(sd, n, margin, alpha), 2),
            max(prompts_needed(sd, margin, alpha, power) or 0, floor) or "-",
        )
        for sd in spreads
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="sdxl", help="whose gate margins to use (default: sdxl)")
    parser.add_argument("--prompts", type=int, help="paired prompts (default: the default prompt set's size)")
    parser.add_argument("--summary", type=Path, help="an evaluation summary.json: its measured spreads too")
    args = parser.parse_args()

    params = load_params(args.params)
    raw = __import__("yaml").safe_load(Path(args.params).read_text())
    margins = {**params.gate.margins.model_dump(), **raw["profiles"][args.profile]["gate"].get("margins", {})}
    n = args.prompts or len(load_prompt_set(params.evaluate.prompts))
    alpha = one_sided_alpha(params.evaluate.bootstrap.confidence)
    power = params.gate.min_power
    headers = [
        "metric",
        "sd of per-prompt differences",
        "prompts",
        f"detectable margin at {power:g} power",
        f"{args.profile} margin",
        "power at that margin",
        "prompts needed",
    ]
    rows = []
    for metric, spreads in SPREADS.items():
        rows += rows_for(metric, spreads, n, margins[metric], alpha, power, params.gate.min_prompts)
    print(table_md(headers, rows))
    if args.summary:
        summary = json.loads(args.summary.read_text())
        measured = []
        for name, comparison in summary.get("comparisons", {}).items():
            for metric in SPREADS:
                values = comparison[metric]
                measured += rows_for(
                    f"{metric} ({name}, measured)",
                    [values["sd_diff"]],
                    values["prompts"],
                    margins[metric],
                    alpha,
                    power,
                    params.gate.min_prompts,
                )
        print()
        print(table_md(headers, measured))


if __name__ == "__main__":
    main()
