"""The promotion gate: every rule evaluated, a decision record, and fail-closed by construction.

Rules (thresholds in params.yaml `gate`):
- freshness: the evaluation is of this model (content fingerprint), of the current prompt set
  (sha256), and against the current production version;
- absolute floors: mean aesthetic score, mean CLIP score, share of images under an aesthetic floor;
- non-inferiority: the lower bound of the bootstrap CI of the paired difference (candidate minus
  reference) is above -margin, for each metric; the reference is production, or the base model
  when nothing is in production yet;
- optional superiority on one metric: the lower bound is above 0.
A missing, non-numeric or NaN value fails its rule. The model is promoted only if all pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from components import report
from components.config import GateParams
from components.fsutil import sha256_file


@dataclass
class RuleResult:
    rule: str
    value: float | str | None
    op: str  # how value must relate to threshold: >=, >, <=, ==
    threshold: float | str | None
    passed: bool
    note: str = ""


@dataclass
class GateInputs:
    """What the gate looks at, gathered (and hashed) by the caller."""

    summary: dict
    summary_sha256: str
    candidate_scores: pd.Series | None  # the candidate's per-image aesthetic scores
    model_fingerprint: str | None  # of the model folder being promoted (None: no model)
    prompt_set_sha256: str | None  # of the prompt set file now
    production_version: str | None  # the alias's version now (None: nothing in production)


def _get(data: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _number(data: object, *keys: str) -> float | None:
    value = _get(data, *keys)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _bad(value: float | None) -> str | None:
    if value is None:
        return "missing or not a number in the evaluation summary"
    if math.isnan(value):
        return "NaN"
    return None


def compare(rule: str, value: float | None, op: str, threshold: float, note: str = "") -> RuleResult:
    """A numeric rule; a missing or NaN value fails it."""
    bad = _bad(value)
    if bad:
        return RuleResult(rule, value, op, threshold, False, f"{note}; {bad}" if note else bad)
    passed = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold}[op]
    return RuleResult(rule, value, op, threshold, passed, note)


def same(rule: str, evaluated: object, current: object, what: str) -> RuleResult:
    passed = evaluated == current

    def short(v: object) -> object:
        return "none" if v is None else v[:16] if isinstance(v, str) else v

    note = "" if passed else f"stale: the evaluation was of another {what}"
    return RuleResult(rule, short(evaluated), "==", short(current), passed, note)


def evaluate_gate(inputs: GateInputs, params: GateParams) -> tuple[list[RuleResult], str | None]:
    """All rules, and the name of the reference model the comparisons used."""
    s = inputs.summary
    rules = [
        same("evaluated_this_model", s.get("model_fingerprint"), inputs.model_fingerprint or "no model", "model"),
        same("evaluated_this_prompt_set", s.get("prompt_set_sha256"), inputs.prompt_set_sha256, "prompt set"),
        same(
            "evaluated_against_current_production",
            s.get("production_version"),
            inputs.production_version,
            "production model",
        ),
        compare("aesthetic_mean", _number(s, "aesthetic", "mean"), ">=", params.min_aesthetic_mean),
        compare("clip_score_mean", _number(s, "clip_score", "mean"), ">=", params.min_clip_score_mean),
    ]
    if inputs.candidate_scores is None or inputs.candidate_scores.empty:
        share = None
    else:
        share = float((inputs.candidate_scores.astype(float) < params.aesthetic_floor).mean())
        if inputs.candidate_scores.isna().any():
            share = float("nan")
    rules.append(
        compare(f"share_below_aesthetic_{params.aesthetic_floor:g}", share, "<=", params.max_share_below_floor)
    )
    comparisons = _get(s, "comparisons") or {}
    reference = "production" if "vs_production" in comparisons else "base" if "vs_base" in comparisons else None
    if reference is None:
        rules.append(RuleResult("non_inferiority", None, ">", None, False, "no comparison with production or base"))
        return rules, None
    comparison = comparisons[f"vs_{reference}"]
    for metric, margin in (("aesthetic", params.margins.aesthetic), ("clip_score", params.margins.clip_score)):
        low = _number(comparison, metric, "ci_low")
        rules.append(
            compare(
                f"non_inferiority_{metric}_vs_{reference}",
                low,
                ">",
                -margin,
                f"CI lower bound of candidate - {reference} > -margin",
            )
        )
    if params.superiority:
        low = _number(comparison, params.superiority, "ci_low")
        rules.append(
            compare(
                f"superiority_{params.superiority}_vs_{reference}",
                low,
                ">",
                0.0,
                f"CI lower bound of candidate - {reference} > 0",
            )
        )
    return rules, reference


def gather_inputs(
    summary_path: Path, scores_path: Path, model_dir: Path, prompts_path: Path, production_version: str | None
) -> GateInputs:
    """Read and hash what the gate looks at; anything unreadable becomes a failing rule, not a crash."""
    import json

    from components.evaluate.models import folder_fingerprint

    try:
        summary = json.loads(summary_path.read_text())
        if not isinstance(summary, dict):
            summary = {}
        summary_sha = sha256_file(summary_path)
    except (OSError, ValueError):
        summary, summary_sha = {}, "unreadable"
    scores = None
    try:
        table = pd.read_csv(scores_path)
        scores = table.loc[table["model"] == "candidate", "aesthetic_score"]
    except (OSError, ValueError, KeyError):
        pass
    fingerprint = folder_fingerprint(model_dir) if (model_dir / "model_index.json").is_file() else None
    prompt_sha = sha256_file(prompts_path) if prompts_path.is_file() else None
    return GateInputs(summary, summary_sha, scores, fingerprint, prompt_sha, production_version)


def decision_record(inputs: GateInputs, rules: list[RuleResult], reference: str | None, name: str, alias: str) -> dict:
    return {
        "promote": all(r.passed for r in rules),
        "verdict": "promote" if all(r.passed for r in rules) else "reject",
        "model_name": name,
        "alias": alias,
        "reference": reference,
        "inputs": {
            "model_fingerprint": inputs.model_fingerprint or "missing",
            "summary_sha256": inputs.summary_sha256,
            "prompt_set_sha256": inputs.prompt_set_sha256 or "missing",
            "production_version": inputs.production_version,
        },
        "rules": [asdict(r) for r in rules],
        "registry": None,
    }


def decision_markdown(decision: dict) -> str:
    verdict = "PROMOTE" if decision["promote"] else "REJECT"
    rows = [
        (
            r["rule"],
            report.fmt(r["value"]),
            f"{r['op']} {report.fmt(r['threshold'])}",
            "pass" if r["passed"] else "FAIL",
            r["note"],
        )
        for r in decision["rules"]
    ]
    inputs = decision["inputs"]
    lines = [
        f"## Promotion gate: **{verdict}**",
        "",
        report.table_md(["rule", "value", "required", "verdict", "note"], rows),
        "",
        f"- model fingerprint `{inputs['model_fingerprint'][:16]}`, evaluation summary sha256 "
        f"`{inputs['summary_sha256'][:16]}`, prompt set sha256 `{inputs['prompt_set_sha256'][:16]}`",
        f"- reference for non-inferiority: {decision['reference'] or 'none'}; production now: "
        f"`{inputs['production_version'] or 'none'}`",
    ]
    if decision.get("registry"):
        reg = decision["registry"]
        lines.append(f"- registry: `{reg['uri']}`, alias `{reg['alias']}` -> `{reg['version']}`")
    return "\n".join(lines) + "\n"


def failed_rules_message(decision: dict) -> str:
    return "; ".join(
        f"{r['rule']} = {report.fmt(r['value'])}, required {r['op']} {report.fmt(r['threshold'])}"
        + (f" ({r['note']})" if r["note"] else "")
        for r in decision["rules"]
        if not r["passed"]
    )
