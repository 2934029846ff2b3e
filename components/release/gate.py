"""The promotion gate: fail-closed rules over the evaluation's own evidence, and a verdict.

The gate trusts no file. It reads the evaluation summary, the per-image scores, the model folder
and the prompt set, and:
- binds them: the summary names the model's content fingerprint, the prompt set's sha256, the
  production version it was compared with and the sha256 of scores.csv; each must match now;
- recomputes every number it decides on from scores.csv (means, share below the floor, the paired
  per-prompt differences and their bootstrap CI), after checking that the scores cover every
  prompt and seed exactly once with finite values, and requires the summary to agree;
- judges non-inferiority against production (or the base model while nothing is in production)
  only when the prompts carry enough evidence: enough paired prompts, a spread to plan with, and
  the power to detect the margin (paired t-test, noncentral t).
Verdicts: promote (every rule passes), reject (a rule fails), inconclusive (no rule fails but the
evidence cannot support a decision). Only promote promotes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components import report
from components.config import BootstrapParams, EvaluateParams, GateParams
from components.evaluate.stats import (
    min_detectable_margin,
    noninferiority_power,
    one_sided_alpha,
    paired_comparison,
    prompts_needed,
    summarize,
)
from components.plumbing.fsutil import sha256_file
from components.plumbing.numbers import MISSING, describe, lookup, number_at, read_json, text_at

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
VERDICT_EXIT_CODES = {"promote": 0, "unchanged": 0, "reject": 3, "inconclusive": 4}
VERDICT_MEANING = {
    "promote": "every rule passes",
    "unchanged": "the model is the one in production (the same fingerprint): nothing to evaluate or promote",
    "reject": "a rule fails; the model is not promoted",
    "inconclusive": "no rule fails, but the evidence cannot support a decision; the model is not promoted",
}
SCORE_COLUMNS = ("model", "prompt_id", "seed", "aesthetic_score", "clip_score")
# Scores live in [-1, 1] (CLIP) and about [0, 10] (aesthetic): anything past this is corrupt, and
# keeping sums far from overflow keeps every statistic finite.
SCORE_LIMIT = 1e6
# scores.csv is read whole: 5,000 prompts x 8 seeds x 10 models is about 40 MB. Past this, a file is not
# an evaluation's, and is refused before it fills memory.
MAX_SCORES_BYTES = 256 << 20
METRICS = {"aesthetic": "aesthetic_score", "clip_score": "clip_score"}  # summary name -> scores column


@dataclass
class RuleResult:
    rule: str
    value: float | str | None
    op: str  # how value must relate to threshold: >=, >, <=, ==
    threshold: float | str | None
    status: str  # pass | fail | inconclusive
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASS


@dataclass
class GateInputs:
    """What the gate looks at, read and hashed by `gather_inputs`; nothing here is trusted yet."""

    summary: object  # the parsed summary.json: any JSON value
    summary_problem: str | None
    summary_sha256: str | None
    scores: pd.DataFrame | None  # scores.csv as read: every cell a string
    scores_problem: str | None
    scores_sha256: str | None
    model_fingerprint: str | None  # of the model folder being promoted (None: no model)
    model_problem: str | None
    prompt_ids: list[str] | None  # the prompt set now (after any max_prompts selection)
    prompt_set_sha256: str | None
    prompt_problem: str | None
    seeds: list[int]  # the seeds every prompt must have been generated with
    production_version: str | None  # the alias's version now (None: nothing in production)
    training: object = None  # the model folder's training record (easel_train.json): any JSON value
    training_problem: str | None = None
    production_problem: str | None = None  # why production's version is not whole (None: it is, or none)


@dataclass
class GateResult:
    verdict: str
    reference: str
    rules: list[RuleResult]
    evidence: dict = field(default_factory=dict)  # per metric: prompts, spread, CI, power, MDE, prompts needed
    metrics: dict = field(default_factory=dict)  # recomputed summaries of the candidate and the reference


# -- reading -------------------------------------------------------------------------------------


def gather_inputs(
    summary_path: Path,
    scores_path: Path,
    model_dir: Path,
    evaluate: EvaluateParams,
    production_version: str | None,
    production_problem: str | None = None,
) -> GateInputs:
    """Read and hash what the gate looks at; whatever cannot be read is recorded, never raised.
    `production_problem`: why the version in production is not whole (the registry checked it)."""
    from components.plumbing.errors import EaselError
    from components.plumbing.fsutil import model_fingerprint
    from components.prompts import load_prompt_set

    summary, summary_problem = read_json(summary_path)
    summary_sha = sha256_file(summary_path) if summary_problem is None else None
    scores, scores_problem, scores_sha = None, None, None
    try:
        if (size := scores_path.stat().st_size) > MAX_SCORES_BYTES:
            raise ValueError(f"{size} bytes, more than the {MAX_SCORES_BYTES} an evaluation writes")
        scores = pd.read_csv(scores_path, dtype=str, keep_default_na=False)
        scores_sha = sha256_file(scores_path)
    except FileNotFoundError:
        scores_problem = f"{scores_path}: not found"
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        scores_problem = f"{scores_path}: cannot be read as CSV ({str(exc).splitlines()[0] if str(exc) else exc!r})"
    fingerprint, model_problem = None, None
    if (model_dir / "model_index.json").is_file():
        try:
            fingerprint = model_fingerprint(model_dir)
        except OSError as exc:
            model_problem = f"the model at {model_dir} cannot be read ({exc})"
    else:
        model_problem = f"no model at {model_dir} (no model_index.json); run the train stage"
    prompt_ids, prompt_sha, prompt_problem = None, None, None
    try:
        prompts = load_prompt_set(evaluate.prompts, evaluate.negative_prompt, evaluate.max_prompts)
        prompt_ids, prompt_sha = prompts["id"].tolist(), sha256_file(evaluate.prompts)
    except (EaselError, OSError) as exc:
        prompt_problem = str(exc)
    return GateInputs(
        summary,
        summary_problem,
        summary_sha,
        scores,
        scores_problem,
        scores_sha,
        fingerprint,
        model_problem,
        prompt_ids,
        prompt_sha,
        prompt_problem,
        list(evaluate.seeds),
        production_version,
        *read_json(model_dir / TRAINING_RECORD),
        production_problem,
    )


def usable_scores(
    table: pd.DataFrame | None, models: list[str], prompt_ids: list[str] | None, seeds: list[int]
) -> tuple[pd.DataFrame | None, str | None]:
    """The rows of `models` with finite float scores, covering every (prompt, seed) exactly once.

    Returns (rows, None) or (None, "what is wrong, naming the row"). Row numbers are the file's
    line numbers (the header is line 1).
    """
    if table is None:
        return None, "no scores"
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        return None, f"scores.csv lacks the column(s) {', '.join(missing)}"
    rows = table.loc[table["model"].isin(models), list(SCORE_COLUMNS)].copy()
    for column in ("seed", "aesthetic_score", "clip_score"):
        raw = rows[column].astype(str)
        values = pd.to_numeric(raw.str.strip(), errors="coerce").astype(float).to_numpy()
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(values) <= SCORE_LIMIT)  # NaN, infinities and absurd magnitudes
            if column == "seed":
                bad |= values != np.round(values)
        if bad.any():
            first = rows.index[bad][0]
            return None, (
                f"scores.csv line {int(first) + 2}: {column} {describe(raw[first])} is not a finite number "
                f"within +-{SCORE_LIMIT:g}" + (" (seeds are integers)" if column == "seed" else "")
            )
        rows[column] = values.astype(np.int64) if column == "seed" else values
    duplicated = rows.duplicated(["model", "prompt_id", "seed"])
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        return None, f"scores.csv has {first['model']} {first['prompt_id']} seed {first['seed']} more than once"
    for model in models:
        mine = rows[rows["model"] == model]
        have = set(zip(mine["prompt_id"], mine["seed"].tolist(), strict=True))
        if not have:
            return None, f"scores.csv has no rows for {model}"
        if prompt_ids is None:
            continue
        want = {(p, s) for p in prompt_ids for s in seeds}
        if have != want:
            lacking, extra = sorted(want - have), sorted(have - want)
            detail = f"lacks {lacking[0][0]} seed {lacking[0][1]}" if lacking else ""
            detail += ("; " if detail and extra else "") + (f"has {extra[0][0]} seed {extra[0][1]}" if extra else "")
            return None, (
                f"scores.csv does not cover the prompt set x seeds for {model}: {detail} "
                f"({len(lacking)} prompt-seed pairs missing, {len(extra)} not in the prompt set)"
            )
    return rows, None


# -- rules ---------------------------------------------------------------------------------------


def compare(rule: str, value: float | None, op: str, threshold: float, note: str = "") -> RuleResult:
    """A numeric rule; a missing or non-finite value fails it."""
    if value is None or not math.isfinite(value):
        reason = note or ("missing" if value is None else f"{describe(value)} is not finite")
        return RuleResult(rule, None, op, threshold, FAIL, reason)
    passed = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold}[op]
    return RuleResult(rule, value, op, threshold, PASS if passed else FAIL, note if not passed else "")


def same(rule: str, evaluated: str | None, current: str | None, what: str, current_problem: str | None) -> RuleResult:
    """A binding: the summary names what it evaluated, which must be what exists now."""

    def short(v: str | None) -> str:
        return "none" if v is None else v[:16]

    if current_problem:
        return RuleResult(rule, short(evaluated), "==", "none", FAIL, current_problem)
    if evaluated is None:
        return RuleResult(rule, "none", "==", short(current), FAIL, f"the summary does not name the {what}")
    if evaluated != current:
        return RuleResult(
            rule, short(evaluated), "==", short(current), FAIL, f"stale: the evaluation was of another {what}"
        )
    return RuleResult(rule, short(evaluated), "==", short(current), PASS)


def _production_binding(summary: object, current: str | None) -> RuleResult:
    rule = "evaluated_against_current_production"
    evaluated = lookup(summary, "production_version")  # null is a value: nothing was in production
    if evaluated is MISSING or not (evaluated is None or isinstance(evaluated, str)):
        shown = "none" if evaluated is MISSING else describe(evaluated)
        note = "the summary does not name the production version it was compared with"
        return RuleResult(rule, shown, "==", current or "none", FAIL, note)
    if evaluated != current:
        note = "stale: the evaluation compared with another production model"
        return RuleResult(rule, evaluated or "none", "==", current or "none", FAIL, note)
    return RuleResult(rule, evaluated or "none", "==", current or "none", PASS)


def _production_whole(version: str | None, problem: str | None) -> RuleResult:
    """What a candidate is compared with must exist: an alias pointing at a version that is gone or
    lacks files is no production to be non-inferior to (fix the registry first: rollback, or verify)."""
    rule = "production_is_whole"
    if version is None:
        return RuleResult(rule, "none in production", "==", "whole", PASS)
    if problem:
        return RuleResult(rule, version, "==", "whole", FAIL, f"production {version} is not whole: {problem}")
    return RuleResult(rule, version, "==", "whole", PASS)


def _bindings(inputs: GateInputs) -> list[RuleResult]:
    s = inputs.summary
    if inputs.summary_problem:
        readable = RuleResult("evaluation_summary", "unusable", "==", "an object", FAIL, inputs.summary_problem)
    elif not isinstance(s, dict):
        readable = RuleResult("evaluation_summary", describe(s), "==", "an object", FAIL, "not a JSON object")
    else:
        readable = RuleResult("evaluation_summary", "an object", "==", "an object", PASS)
    return [
        readable,
        same(
            "evaluated_this_model",
            text_at(s, "model_fingerprint"),
            inputs.model_fingerprint,
            "model",
            inputs.model_problem,
        ),
        same(
            "evaluated_this_prompt_set",
            text_at(s, "prompt_set_sha256"),
            inputs.prompt_set_sha256,
            "prompt set",
            inputs.prompt_problem,
        ),
        _production_binding(s, inputs.production_version),
        _production_whole(inputs.production_version, inputs.production_problem),
        same(
            "evaluated_these_scores",
            text_at(s, "scores_sha256"),
            inputs.scores_sha256,
            "scores file",
            inputs.scores_problem,
        ),
    ]


def _agreement(summary: object, recomputed: dict[str, float]) -> RuleResult:
    """The summary's numbers must be the ones scores.csv gives (a hand edit or a bug shows here)."""
    problems = []
    for path, value in recomputed.items():
        stated, problem = number_at(summary, path)
        if problem:
            problems.append(problem)
        elif not math.isfinite(value):
            problems.append(f"{path}: scores.csv gives {describe(value)}")
        elif not math.isclose(stated, value, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{path}: the summary says {stated:.6g}, scores.csv gives {value:.6g}")
    if not problems:
        return RuleResult("summary_matches_scores", "agrees", "==", "scores.csv", PASS)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return RuleResult("summary_matches_scores", "disagrees", "==", "scores.csv", FAIL, problems[0] + more)


def _evidence(comparison: dict, metric: str, margin: float, gate: GateParams, confidence: float) -> dict:
    values = comparison[metric]
    alpha = one_sided_alpha(confidence)
    sd, n = values["sd_diff"], values["prompts"]
    return {
        "prompts": n,
        "mean_diff": values["mean_diff"],
        "ci_low": values["ci_low"],
        "ci_high": values["ci_high"],
        "win_rate": values["win_rate"],
        "sd_diff": sd,
        "margin": margin,
        "power": noninferiority_power(sd, n, margin, alpha),
        "min_detectable_margin": min_detectable_margin(sd, n, alpha, gate.min_power),
        "prompts_needed": _at_least(prompts_needed(sd, margin, alpha, gate.min_power), gate.min_prompts),
    }


def _at_least(needed: int | None, floor: int) -> int | None:
    return None if needed is None else max(needed, floor)


def _noninferiority(rule: str, ev: dict | None, gate: GateParams, problem: str | None) -> RuleResult:
    """pass, fail, or inconclusive when the prompts cannot carry a decision at this margin."""
    if ev is None:
        return RuleResult(rule, None, ">", None, FAIL, problem or "no usable scores")
    margin, low, high = ev["margin"], ev["ci_low"], ev["ci_high"]
    n, sd, power = ev["prompts"], ev["sd_diff"], ev["power"]

    def result(status: str, note: str = "") -> RuleResult:
        value = low if math.isfinite(low) else None
        return RuleResult(rule, value, ">", -margin, status, note)

    if not (math.isfinite(low) and math.isfinite(high)):
        return result(FAIL, "the confidence interval could not be computed")
    if n < gate.min_prompts:
        return result(INCONCLUSIVE, f"{n} paired prompts; a decision needs at least {gate.min_prompts}")
    if high < -margin:  # worse by more than the margin whatever the power: a conclusive no
        return result(FAIL, f"candidate worse: the whole CI [{low:.4g}, {high:.4g}] is below -{margin:g}")
    if not sd > 0:
        return result(INCONCLUSIVE, f"zero-width interval: all {n} prompts differ by exactly {low:.4g}")
    if not power >= gate.min_power:
        needed = ev["prompts_needed"]
        return result(
            INCONCLUSIVE,
            f"power {power:.2f} < {gate.min_power:g} to detect the margin {margin:g} with {n} prompts "
            f"(sd of differences {sd:.3g}); about {needed if needed else 'too many'} prompts needed",
        )
    if low > -margin:
        return result(PASS)
    return result(FAIL, f"CI lower bound {low:.4g} is not above -{margin:g} (power {power:.2f})")


def judge(inputs: GateInputs, gate: GateParams, bootstrap: BootstrapParams) -> GateResult:
    """Every rule, and the verdict. Pure: no I/O, and no input makes it raise."""
    reference = "production" if inputs.production_version is not None else "base"
    rules = _bindings(inputs)
    rows, problem = (
        (None, inputs.scores_problem)
        if inputs.scores_problem
        else usable_scores(inputs.scores, ["candidate", reference], inputs.prompt_ids, inputs.seeds)
    )
    rules.append(
        RuleResult(
            "scores_complete",
            "complete" if rows is not None else "unusable",
            "==",
            "complete",
            PASS if rows is not None else FAIL,
            problem or "",
        )
    )
    metrics: dict = {}
    evidence: dict = {}
    share = None
    comparison = None
    if rows is not None:
        with np.errstate(all="ignore"):
            candidate = rows[rows["model"] == "candidate"]
            metrics = {"candidate": summarize(candidate), reference: summarize(rows[rows["model"] == reference])}
            share = float((candidate["aesthetic_score"] < gate.aesthetic_floor).mean())
            comparison = paired_comparison(
                rows, "candidate", reference, bootstrap.confidence, bootstrap.resamples, bootstrap.seed
            )
        for metric in METRICS:
            margin = getattr(gate.margins, metric)
            evidence[metric] = _evidence(comparison, metric, margin, gate, bootstrap.confidence)
    no_scores = None if rows is not None else "no usable scores"
    mean = {m: metrics["candidate"][m]["mean"] for m in METRICS} if metrics else {}
    rules += [
        compare("aesthetic_mean", mean.get("aesthetic"), ">=", gate.min_aesthetic_mean, no_scores or ""),
        compare("clip_score_mean", mean.get("clip_score"), ">=", gate.min_clip_score_mean, no_scores or ""),
        compare(
            f"share_below_aesthetic_{gate.aesthetic_floor:g}", share, "<=", gate.max_share_below_floor, no_scores or ""
        ),
    ]
    if comparison is not None:
        recomputed = {"aesthetic.mean": mean["aesthetic"], "clip_score.mean": mean["clip_score"]}
        for metric in METRICS:
            for stat in ("mean_diff", "ci_low", "ci_high"):
                recomputed[f"comparisons.vs_{reference}.{metric}.{stat}"] = comparison[metric][stat]
        rules.append(_agreement(inputs.summary, recomputed))
    else:
        rules.append(RuleResult("summary_matches_scores", None, "==", "scores.csv", FAIL, "no usable scores"))
    for metric in METRICS:
        rules.append(_noninferiority(f"non_inferiority_{metric}_vs_{reference}", evidence.get(metric), gate, problem))
    if gate.superiority:
        ev = evidence.get(gate.superiority)
        rules.append(
            compare(
                f"superiority_{gate.superiority}_vs_{reference}",
                ev["ci_low"] if ev else None,
                ">",
                0.0,
                "" if ev else "no usable scores",
            )
        )
    if gate.max_val_loss_ratio is not None:
        rules += _training_health(inputs, gate.max_val_loss_ratio)
    statuses = {r.status for r in rules}
    verdict = "reject" if FAIL in statuses else "inconclusive" if INCONCLUSIVE in statuses else "promote"
    return GateResult(verdict, reference, rules, evidence, metrics)


TRAINING_RECORD = "easel_train.json"  # written by the train stage into the model folder (part of its fingerprint)


def _training_health(inputs: GateInputs, max_ratio: float) -> list[RuleResult]:
    """Training went as it should: its losses stayed finite, and the weights it saved fit held-out
    images about as well as the base model did (a learning rate 500x too high shows here, where the
    scores of a few prompts may not)."""
    record, problem = inputs.training, inputs.training_problem
    if problem is not None:
        why = f"no training record: {problem}"
        return [
            RuleResult("training_losses_finite", None, "==", "finite", FAIL, why),
            RuleResult("val_loss_vs_base", None, "<=", max_ratio, FAIL, why),
        ]
    final, final_problem = number_at(record, "final_loss")
    finite = final_problem is None and math.isfinite(final)
    rules = [
        RuleResult(
            "training_losses_finite",
            "finite" if finite else "not finite",
            "==",
            "finite",
            PASS if finite else FAIL,
            "" if finite else f"final_loss: {final_problem or describe(final)}",
        )
    ]
    saved, saved_problem = number_at(record, "saved_val_loss")
    base, base_problem = number_at(record, "base_val_loss")
    if saved_problem or base_problem:
        note = f"{TRAINING_RECORD}: {saved_problem or base_problem} (is train.validation.fraction 0?)"
        rules.append(RuleResult("val_loss_vs_base", None, "<=", max_ratio, FAIL, note))
    elif not (base > 0):
        rules.append(RuleResult("val_loss_vs_base", None, "<=", max_ratio, FAIL, f"base_val_loss {describe(base)}"))
    else:
        ratio = compare("val_loss_vs_base", saved / base, "<=", max_ratio)
        ratio.note = f"held-out loss {saved:.4g} against the base model's {base:.4g}"
        rules.append(ratio)
    return rules


# -- records ---------------------------------------------------------------------------------------


def decision_record(inputs: GateInputs, result: GateResult, gate: GateParams, name: str, alias: str) -> dict:
    return {
        "verdict": result.verdict,
        "promote": result.verdict == "promote",
        "model_name": name,
        "alias": alias,
        "reference": result.reference,
        "inputs": {
            "model_fingerprint": inputs.model_fingerprint,
            "summary_sha256": inputs.summary_sha256,
            "scores_sha256": inputs.scores_sha256,
            "prompt_set_sha256": inputs.prompt_set_sha256,
            "production_version": inputs.production_version,
        },
        "rules": [asdict(r) | {"passed": r.passed} for r in result.rules],
        "power_target": gate.min_power,
        "evidence": result.evidence,
        "metrics": result.metrics,
        "registry": None,
    }


def unchanged_record(
    model_fingerprint: str, production_version: str, production_fingerprint: str | None, name: str, alias: str
) -> dict | None:
    """The decision when the candidate is production's model itself, or None when it is not.

    Comparing a model with itself has nothing to measure (every paired difference is zero); the
    question a pull request that does not touch the model asks is only "is it still that model?".
    Both fingerprints are of weights and meaningful config (components.plumbing.fsutil.model_fingerprint):
    production's as its manifest recorded it when it was published, the candidate's computed now.
    """
    if not production_fingerprint or production_fingerprint != model_fingerprint:
        return None
    rule = RuleResult(
        "same_model_as_production",
        model_fingerprint,
        "==",
        production_fingerprint,
        PASS,
        f"production ({production_version}) has this fingerprint",
    )
    return {
        "verdict": "unchanged",
        "promote": False,
        "model_name": name,
        "alias": alias,
        "reference": "production",
        "inputs": {
            "model_fingerprint": model_fingerprint,
            "summary_sha256": None,
            "scores_sha256": None,
            "prompt_set_sha256": None,
            "production_version": production_version,
        },
        "rules": [asdict(rule) | {"passed": True}],
        "power_target": None,
        "evidence": {},
        "metrics": {},
        "registry": None,
    }


def evidence_table_md(decision: dict) -> str:
    """Per metric: how much the paired prompts can tell at the gate's margin."""
    rows = []
    for metric, ev in (decision.get("evidence") or {}).items():
        needed = ev.get("prompts_needed")
        rows.append(
            (
                metric,
                ev["prompts"],
                report.fmt(ev["sd_diff"]),
                report.fmt(ev["margin"]),
                report.fmt(ev["power"], 2),
                report.fmt(ev["min_detectable_margin"]),
                needed if needed is not None else "-",
            )
        )
    target = report.fmt(decision.get("power_target"), 2)
    return report.table_md(
        [
            "metric",
            "paired prompts",
            "sd of differences",
            "margin",
            "power at margin",
            f"detectable at {target} power",
            "prompts needed",
        ],
        rows,
    )


def decision_markdown(decision: dict) -> str:
    verdict = decision["verdict"]
    rows = [
        (
            r["rule"],
            report.fmt(r["value"]),
            f"{r['op']} {report.fmt(r['threshold'])}",
            r["status"] if r["status"] == PASS else r["status"].upper(),
            r["note"],
        )
        for r in decision["rules"]
    ]
    inputs = decision["inputs"]

    def short(value: str | None) -> str:
        return (value or "missing")[:16]

    lines = [
        f"## Promotion gate: **{verdict.upper()}**",
        "",
        f"{VERDICT_MEANING[verdict].capitalize()}.",
        "",
        report.table_md(["rule", "value", "required", "verdict", "note"], rows),
        "",
    ]
    if decision.get("evidence"):
        lines += [
            f"Evidence against {decision['reference']}: power of the paired prompts to show non-inferiority at "
            f"each margin (paired t-test; a decision needs power >= {report.fmt(decision['power_target'], 2)}):",
            "",
            evidence_table_md(decision),
            "",
        ]
    lines += [
        f"- model fingerprint `{short(inputs['model_fingerprint'])}`, evaluation summary sha256 "
        f"`{short(inputs['summary_sha256'])}`, scores sha256 `{short(inputs['scores_sha256'])}`, prompt set sha256 "
        f"`{short(inputs['prompt_set_sha256'])}`",
        f"- reference for non-inferiority: {decision['reference']}; production now: "
        f"`{inputs['production_version'] or 'none'}`",
    ]
    if decision.get("registry"):
        reg = decision["registry"]
        lines.append(f"- registry: `{reg['uri']}`, alias `{reg['alias']}` -> `{reg['version']}`")
    return "\n".join(lines) + "\n"


def failed_rules_message(decision: dict, limit: int = 3) -> str:
    """One line: the rules that did not pass, with their reasons (the first `limit` of them)."""
    failed = [r for r in decision["rules"] if r["status"] != PASS]
    parts = [f"{r['rule']} ({r['note'] or r['status']})" for r in failed[:limit]]
    if len(failed) > limit:
        parts.append(f"and {len(failed) - limit} more")
    return "; ".join(parts)
