"""The promotion gate fails closed on every input and decides only on enough evidence.

The unit tests write real evaluation files (as the evaluate stage does, with the same statistics
code) and corrupt them the ways a broken job, a hand edit or a bug would; the CLI tests run
`easel gate` against a real SeaweedFS; the property test throws arbitrary shapes and values at
the gate.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from components.cli import main
from components.config import BootstrapParams, EvaluateParams, GateParams
from components.evaluate.stats import (
    min_detectable_margin,
    noninferiority_power,
    one_sided_alpha,
    prompts_needed,
)
from components.plumbing.numbers import strict_json
from components.release.gate import GateInputs, decision_record, gather_inputs, judge
from components.release.promote import pr_comment
from tests.helpers import evaluation_scores, make_model, sdxl_gate_params, write_evaluation, write_prompts

GATE = sdxl_gate_params()
BOOTSTRAP = (0.95, 2000, 0)


@pytest.fixture()
def evaluation(tmp_path):
    """A consistent evaluation of a 12-prompt set against the base model, nothing in production."""
    prompts = write_prompts(tmp_path / "prompts.csv", 12)
    model = make_model(tmp_path / "model")
    params = EvaluateParams(
        out_dir=str(tmp_path / "eval"), prompts=str(prompts), seeds=[0, 1], bootstrap={"resamples": 2000}
    )
    write_evaluation(tmp_path / "eval", model, prompts, bootstrap=BOOTSTRAP)
    return SimpleNamespace(tmp=tmp_path, prompts=prompts, model=model, params=params, dir=tmp_path / "eval")


def decide(e, production: str | None = None, gate: GateParams = GATE):
    inputs = gather_inputs(e.dir / "summary.json", e.dir / "scores.csv", e.model, e.params, production)
    return judge(inputs, gate, e.params.bootstrap)


def not_passing(result) -> dict[str, str]:
    return {r.rule: r.status for r in result.rules if r.status != "pass"}


def note(result, rule: str) -> str:
    return next(r.note for r in result.rules if r.rule == rule)


def edit_summary(e, change) -> None:
    summary = json.loads((e.dir / "summary.json").read_text())
    change(summary)
    (e.dir / "summary.json").write_text(json.dumps(summary))


def rebind_scores(e) -> None:
    """Record the current scores.csv's sha256 in the summary, as a consistent (if wrong) job would."""
    from components.plumbing.fsutil import sha256_file

    edit_summary(e, lambda s: s.update(scores_sha256=sha256_file(e.dir / "scores.csv")))


# -- the cases from the issue ----------------------------------------------------------------------


def test_a_consistent_evaluation_promotes_with_enough_power(evaluation):
    result = decide(evaluation)
    assert result.verdict == "promote" and result.reference == "base", not_passing(result)
    assert result.evidence["aesthetic"]["power"] >= 0.8 and result.evidence["aesthetic"]["prompts"] == 12


@pytest.mark.parametrize(
    "path",
    [
        "aesthetic.mean",
        "clip_score.mean",
        "comparisons.vs_base.aesthetic.ci_low",
        "comparisons.vs_base.clip_score.ci_low",
    ],
)
def test_infinity_in_the_summary_rejects(evaluation, path):
    text = (evaluation.dir / "summary.json").read_text()
    summary = json.loads(text)
    *parents, last = path.split(".")
    target = summary
    for key in parents:
        target = target[key]
    target[last] = math.inf
    (evaluation.dir / "summary.json").write_text(json.dumps(summary))  # Python writes (and reads) Infinity
    assert "Infinity" in (evaluation.dir / "summary.json").read_text()
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert not_passing(result) == {"summary_matches_scores": "fail"}
    assert f"{path}: inf is not finite" in note(result, "summary_matches_scores")


@pytest.mark.parametrize("cell", ["inf", "-inf", "nan", "abc", "", "1e999", "1" + "0" * 400])
def test_a_bad_cell_in_the_candidates_scores_rejects(evaluation, cell):
    scores = pd.read_csv(evaluation.dir / "scores.csv", dtype=str, keep_default_na=False)
    scores.loc[3, "aesthetic_score"] = cell  # a candidate row (file line 5)
    scores.to_csv(evaluation.dir / "scores.csv", index=False)
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert {"evaluated_these_scores", "scores_complete"} <= set(not_passing(result))  # edited, and unusable
    rebind_scores(evaluation)  # even a summary bound to the edited file does not get it through
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert "scores.csv line 5: aesthetic_score" in note(result, "scores_complete")
    share = next(r for r in result.rules if r.rule.startswith("share_below"))
    assert share.status == "fail" and share.value is None  # never computed from a bad cell


def test_with_production_the_reference_is_production_even_if_the_summary_offers_base(evaluation):
    # Evaluated with production in the registry, but the production comparison was dropped.
    write_evaluation(evaluation.dir, evaluation.model, evaluation.prompts, production_version="v1", bootstrap=BOOTSTRAP)
    assert decide(evaluation, production="v1").verdict == "promote"
    edit_summary(evaluation, lambda s: s["comparisons"].pop("vs_production"))
    result = decide(evaluation, production="v1")
    assert result.reference == "production" and result.verdict == "reject"
    assert "comparisons.vs_production.aesthetic.mean_diff: missing" in note(result, "summary_matches_scores")

    # An evaluation made before anything was in production, judged after: stale, and no production rows.
    write_evaluation(evaluation.dir, evaluation.model, evaluation.prompts, bootstrap=BOOTSTRAP)
    result = decide(evaluation, production="v1")
    assert result.verdict == "reject" and result.reference == "production"
    assert not_passing(result)["evaluated_against_current_production"] == "fail"
    assert note(result, "scores_complete") == "scores.csv has no rows for production"
    assert "non_inferiority_aesthetic_vs_production" in not_passing(result)


def test_no_model_and_no_prompt_set_reject(evaluation):
    shutil.rmtree(evaluation.model)
    evaluation.prompts.unlink()
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert "no model at" in note(result, "evaluated_this_model")
    assert "prompt set not found" in note(result, "evaluated_this_prompt_set")


def test_huge_numbers_and_wrong_types_in_the_summary_reject(evaluation):
    text = (evaluation.dir / "summary.json").read_text()
    mean = json.dumps(json.loads(text)["aesthetic"]["mean"])
    (evaluation.dir / "summary.json").write_text(text.replace(f'"mean": {mean}', '"mean": 1' + "0" * 400, 1))
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert "aesthetic.mean: an integer of 401 digits is too large for a float" in note(result, "summary_matches_scores")

    (evaluation.dir / "summary.json").write_text(text.replace(f'"mean": {mean}', '"mean": 1' + "0" * 5000, 1))
    result = decide(evaluation)  # past Python's 4300-digit limit: the file is unreadable, not a crash
    assert result.verdict == "reject" and "not valid JSON" in note(result, "evaluation_summary")

    for shape in ([1, 2], "text", None, {"aesthetic": [], "clip_score": "x", "comparisons": 3, "models": []}):
        (evaluation.dir / "summary.json").write_text(json.dumps(shape))
        result = decide(evaluation)
        assert result.verdict == "reject"
        decision = decision_record(gather_inputs_of(evaluation), result, GATE, "m", "production")
        comment = pr_comment(decision)  # the PR comment renders whatever the summary was
        assert "**fails the gate**" in comment and "evaluated_this_model" in comment


def gather_inputs_of(e, production=None) -> GateInputs:
    return gather_inputs(e.dir / "summary.json", e.dir / "scores.csv", e.model, e.params, production)


def test_unreadable_files_are_failing_rules_not_crashes(evaluation):
    (evaluation.dir / "summary.json").unlink()
    (evaluation.dir / "summary.json").mkdir()  # a folder where the file should be
    (evaluation.dir / "scores.csv").write_bytes(b"\xff\xfe\x00garbage\n\x00\x01")
    evaluation.prompts.write_text("")
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert "cannot be read" in note(result, "evaluation_summary")
    assert "prompt set is empty" in note(result, "evaluated_this_prompt_set")
    assert note(result, "scores_complete")  # whatever the bytes were, a reason and not an exception


def test_an_oversized_scores_file_is_refused_unread(evaluation, monkeypatch):
    """scores.csv is read whole; one larger than any evaluation writes is a reason, not a memory spike."""
    from components.release import gate

    monkeypatch.setattr(gate, "MAX_SCORES_BYTES", 1000)  # rather than writing 256 MB here
    read_csv = gate.pd.read_csv

    def reading(path, *args, **kwargs):
        if Path(path).name == "scores.csv":
            pytest.fail("an oversized scores.csv was read")
        return read_csv(path, *args, **kwargs)

    monkeypatch.setattr(gate.pd, "read_csv", reading)
    result = decide(evaluation)
    assert result.verdict == "reject" and "more than the 1000 an evaluation writes" in note(result, "scores_complete")


def test_a_swapped_scores_file_is_stale(evaluation, tmp_path):
    other = write_evaluation(tmp_path / "other", evaluation.model, evaluation.prompts, rng_seed=7, bootstrap=BOOTSTRAP)
    shutil.copy(other / "scores.csv", evaluation.dir / "scores.csv")
    result = decide(evaluation)
    assert result.verdict == "reject"
    assert note(result, "evaluated_these_scores") == "stale: the evaluation was of another scores file"
    assert "the summary says" in note(result, "summary_matches_scores")  # and its numbers do not match either


def test_changed_seeds_or_prompt_selection_make_the_scores_incomplete(evaluation):
    evaluation.params = evaluation.params.model_copy(update={"seeds": [0, 1, 2]})
    result = decide(evaluation)
    assert result.verdict == "reject" and "lacks p00 seed 2" in note(result, "scores_complete")
    evaluation.params = evaluation.params.model_copy(update={"seeds": [0, 1], "max_prompts": 6})
    result = decide(evaluation)
    assert result.verdict == "reject" and "0 prompt-seed pairs missing, 12 not in the prompt set" in note(
        result, "scores_complete"
    )


# -- enough evidence -------------------------------------------------------------------------------


def test_one_prompt_is_inconclusive(evaluation):
    write_prompts(evaluation.prompts, 1)
    write_evaluation(evaluation.dir, evaluation.model, evaluation.prompts, bootstrap=BOOTSTRAP)
    result = decide(evaluation)
    assert result.verdict == "inconclusive"
    assert not_passing(result) == {
        "non_inferiority_aesthetic_vs_base": "inconclusive",
        "non_inferiority_clip_score_vs_base": "inconclusive",
    }
    assert "1 paired prompts; a decision needs at least 10" in note(result, "non_inferiority_aesthetic_vs_base")


def test_identical_differences_are_a_zero_width_interval_and_inconclusive(evaluation):
    write_evaluation(evaluation.dir, evaluation.model, evaluation.prompts, noise=0.0, bootstrap=BOOTSTRAP)
    result = decide(evaluation)
    assert result.verdict == "inconclusive"
    assert "zero-width interval" in note(result, "non_inferiority_aesthetic_vs_base")


def test_too_few_prompts_for_the_margin_is_inconclusive_and_says_how_many(evaluation):
    write_evaluation(evaluation.dir, evaluation.model, evaluation.prompts, noise=0.3, bootstrap=BOOTSTRAP)
    result = decide(evaluation)
    ev = result.evidence["aesthetic"]
    assert result.verdict == "inconclusive" and ev["power"] < 0.8
    assert ev["prompts_needed"] > 12 and f"about {ev['prompts_needed']} prompts needed" in note(
        result, "non_inferiority_aesthetic_vs_base"
    )
    # ... and with the prompts it asks for (same spread), it decides
    assert noninferiority_power(ev["sd_diff"], ev["prompts_needed"], 0.05, one_sided_alpha(0.95)) >= 0.8


def test_a_conclusively_worse_candidate_is_rejected_whatever_the_power(evaluation):
    write_evaluation(
        evaluation.dir, evaluation.model, evaluation.prompts, aesthetic_diff=-1.0, noise=0.3, bootstrap=BOOTSTRAP
    )
    result = decide(evaluation)
    assert result.evidence["aesthetic"]["power"] < 0.8
    assert result.verdict == "reject" and "candidate worse" in note(result, "non_inferiority_aesthetic_vs_base")


def test_power_agrees_with_a_simulated_paired_t_test():
    """The planning formula against Monte Carlo of the rule it plans for (CI lower bound > -margin)."""
    rng = np.random.default_rng(0)
    n, sd, margin, alpha = 20, 0.2, 0.1, one_sided_alpha(0.95)
    diffs = rng.normal(0.0, sd, (20000, n))
    low = diffs.mean(1) - scipy.stats.t.ppf(1 - alpha, n - 1) * diffs.std(1, ddof=1) / np.sqrt(n)
    simulated = float(np.mean(low > -margin))
    assert abs(noninferiority_power(sd, n, margin, alpha) - simulated) < 0.015
    mde = min_detectable_margin(sd, n, alpha, 0.8)
    assert noninferiority_power(sd, n, mde, alpha) == pytest.approx(0.8, abs=1e-6)
    needed = prompts_needed(sd, margin, alpha, 0.8)
    assert noninferiority_power(sd, needed, margin, alpha) >= 0.8 > noninferiority_power(sd, needed - 1, margin, alpha)


# -- the CLI: exit codes, one line, strict JSON ------------------------------------------------------


@pytest.fixture()
def gate_cli(evaluation, s3_server, monkeypatch):
    """A params.yaml for `easel gate` over the evaluation fixture, against the test SeaweedFS."""
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(evaluation.tmp)
    (evaluation.tmp / "train").mkdir()
    shutil.move(evaluation.model, evaluation.tmp / "train" / "model")
    evaluation.model = evaluation.tmp / "train" / "model"
    write_evaluation(evaluation.dir, evaluation.model, evaluation.prompts, bootstrap=BOOTSTRAP)
    params = {
        "profile": "t",
        "profiles": {"t": {"models": {}, "train": {}, "evaluate": {}, "gate": {}}},
        "storage": {
            "bucket": "gate-" + __import__("os").urandom(3).hex(),
            "embedded": {"port": s3_server.port, "data_dir": str(s3_server.data_dir)},
        },
        "models": {},
        "validate": {},
        "download": {"sources": [{"name": "s", "path": "none.csv"}]},
        "train": {"out_dir": "train"},
        "evaluate": {"out_dir": "eval", "prompts": "prompts.csv", "seeds": [0, 1], "bootstrap": {"resamples": 2000}},
        "promote": {"model_name": "posters", "out_dir": "promote"},
        "gate": GATE.model_dump(),
    }
    (evaluation.tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return evaluation


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--params", "params.yaml", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def strict(path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_cli_exit_codes_one_line_and_strict_decision_files(gate_cli, capsys):
    code, out, err = run_cli(capsys, "gate", "--out", "decision", "--comment", "comment.md")
    assert code == 0 and "gate: promote" in out and err == "", err

    edit_summary(gate_cli, lambda s: s["aesthetic"].update(mean=math.inf))
    code, out, err = run_cli(capsys, "gate", "--out", "decision", "--comment", "comment.md")
    assert code == 3
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("easel gate: gate: reject: a rule fails; the model is not promoted. summary_matches_scores")
    decision = strict(gate_cli.tmp / "decision" / "decision.json")  # Infinity never reaches the record
    assert decision["verdict"] == "reject" and decision["promote"] is False
    assert "**fails the gate**" in (gate_cli.tmp / "comment.md").read_text()

    write_evaluation(gate_cli.dir, gate_cli.model, gate_cli.prompts, noise=0.0, bootstrap=BOOTSTRAP)
    code, out, err = run_cli(capsys, "gate", "--out", "decision", "--comment", "comment.md")
    assert code == 4 and err.count("\n") == 1 and "gate: inconclusive" in err and "zero-width interval" in err
    decision = strict(gate_cli.tmp / "decision" / "decision.json")
    assert decision["verdict"] == "inconclusive" and decision["evidence"]["aesthetic"]["power"] is None
    comment = (gate_cli.tmp / "comment.md").read_text()
    assert "is **inconclusive**" in comment and "power at margin" in comment

    (gate_cli.tmp / "params.yaml").write_text("profile: [")  # unusable input: exit 2
    code, out, err = run_cli(capsys, "gate")
    assert code == 2 and err.count("\n") == 1 and "not valid YAML" in err


def test_promote_publishes_nothing_unless_the_verdict_is_promote(gate_cli, capsys, s3_server):
    from components.release.registry import Registry
    from components.storage import make_client

    write_evaluation(gate_cli.dir, gate_cli.model, gate_cli.prompts, noise=0.3, bootstrap=BOOTSTRAP)
    code, _out, err = run_cli(capsys, "promote")
    assert code == 4 and "(production unchanged) is inconclusive" in err
    bucket = yaml.safe_load((gate_cli.tmp / "params.yaml").read_text())["storage"]["bucket"]
    registry = Registry(make_client(s3_server.settings()), s3_server.settings(), bucket, "registry")
    assert registry.list_versions("posters") == [] and registry.alias("posters", "production") is None
    assert strict(gate_cli.tmp / "promote" / "decision.json")["registry"] is None

    write_evaluation(gate_cli.dir, gate_cli.model, gate_cli.prompts, bootstrap=BOOTSTRAP)
    code, _, err = run_cli(capsys, "promote")
    assert code == 0, err
    assert registry.alias("posters", "production") is not None


# -- the property: no input makes the gate raise, and promote means every rule held ---------------------

_BASES: dict[str, dict] = {}
# Evaluations the gate should promote (clear), find inconclusive (noisy) and reject (worse).
VARIANTS = {"clear": {}, "noisy": {"noise": 0.3}, "worse": {"aesthetic_diff": -1.0, "noise": 0.3}}


def _base_evaluation(variant: str = "clear") -> dict:
    """One consistent evaluation (12 prompts x 2 seeds vs base) per variant, built once, in memory."""
    if variant not in _BASES:
        from components.evaluate.stats import score_summary

        ids = [f"p{i:02d}" for i in range(12)]
        scores = evaluation_scores(ids, **VARIANTS[variant])
        summary = score_summary(scores, ["base"], 0.95, 200, 0) | {
            "model_fingerprint": "model-f",
            "prompt_set_sha256": "prompts-p",
            "production_version": None,
            "scores_sha256": "scores-s",
        }
        _BASES[variant] = {
            "ids": ids,
            "summary": json.loads(json.dumps(summary)),
            "scores": pd.read_csv(io.StringIO(scores.to_csv(index=False)), dtype=str, keep_default_na=False),
        }
    return _BASES[variant]


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**30), 0, 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
SUMMARY_PATHS = [
    "aesthetic.mean",
    "clip_score.mean",
    "aesthetic",
    "clip_score",
    "comparisons",
    "comparisons.vs_base",
    "comparisons.vs_base.aesthetic",
    "comparisons.vs_base.aesthetic.ci_low",
    "comparisons.vs_base.aesthetic.ci_high",
    "comparisons.vs_base.aesthetic.mean_diff",
    "comparisons.vs_base.clip_score.ci_low",
    "comparisons.vs_base.clip_score.mean_diff",
    "model_fingerprint",
    "prompt_set_sha256",
    "production_version",
    "scores_sha256",
]
CELLS = st.sampled_from(["inf", "-inf", "nan", "NaN", "", "abc", "1e999", "1" * 400, "6.2", "-3", "0.5", "1e6", "2e6"])
ROWS = st.integers(0, 47)  # 12 prompts x 2 seeds x 2 models
COLUMNS = st.sampled_from(["model", "prompt_id", "seed", "aesthetic_score", "clip_score"])


MUTATIONS = st.sampled_from([0] * 6 + [1, 2, 3])  # how many things to break; often none


@st.composite
def summaries(draw, variant: str):
    summary = json.loads(json.dumps(_base_evaluation(variant)["summary"]))
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON_VALUES)  # any JSON at all
    for _ in range(draw(MUTATIONS)):
        *parents, last = draw(st.sampled_from(SUMMARY_PATHS)).split(".")
        target = summary
        for key in parents:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if draw(st.booleans()):
                target.pop(last, None)
            else:
                target[last] = draw(JSON_VALUES)
    return summary


@st.composite
def score_tables(draw, variant: str):
    table = _base_evaluation(variant)["scores"].copy()
    for _ in range(draw(MUTATIONS)):
        action = draw(st.sampled_from(["cell", "drop_row", "duplicate_row", "drop_column", "rename_model"]))
        if action == "cell":
            table.loc[draw(ROWS), draw(COLUMNS)] = draw(CELLS)
        elif action == "drop_row":
            table = table.drop(index=draw(ROWS), errors="ignore")
        elif action == "duplicate_row" and len(table):
            table = pd.concat([table, table.iloc[[draw(st.integers(0, len(table) - 1))]]], ignore_index=True)
        elif action == "drop_column":
            table = table.drop(columns=[draw(COLUMNS)], errors="ignore")
        elif action == "rename_model" and "model" in table.columns:
            table.loc[table["model"] == "base", "model"] = draw(st.sampled_from(["production", "Base", ""]))
    return table.reset_index(drop=True)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    variant=st.sampled_from(sorted(VARIANTS)),
    # Each input is as evaluated most of the time, so that every verdict is reached often.
    model=st.sampled_from(["model-f"] * 8 + ["model-g", None]),
    prompt_set=st.sampled_from(["prompts-p"] * 8 + ["prompts-q", None]),
    scores_sha=st.sampled_from(["scores-s"] * 9 + ["scores-t"]),
    production=st.sampled_from([None] * 9 + ["v1"]),
)
def test_property_no_input_raises_and_promote_means_every_rule_held(
    data, variant, model, prompt_set, scores_sha, production
):
    base = _base_evaluation(variant)
    summary = data.draw(summaries(variant), label="summary")
    scores = data.draw(
        st.sampled_from([None] + [variant] * 9).flatmap(lambda v: st.none() if v is None else score_tables(v)),
        label="scores",
    )
    inputs = GateInputs(
        summary=summary,
        summary_problem=None,
        summary_sha256="summary-sha",
        scores=scores,
        scores_problem=None if scores is not None else "scores.csv: not found",
        scores_sha256=scores_sha if scores is not None else None,
        model_fingerprint=model,
        model_problem=None if model else "no model at m",
        prompt_ids=base["ids"] if prompt_set else None,
        prompt_set_sha256=prompt_set,
        prompt_problem=None if prompt_set else "prompts.csv: prompt set not found",
        seeds=[0, 1],
        production_version=production,
    )
    result = judge(inputs, GATE, BootstrapParams(resamples=200))
    decision = decision_record(inputs, result, GATE, "m", "production")
    json.dumps(strict_json(decision), allow_nan=False)  # the record is always strict JSON
    pr_comment(decision)
    assert result.verdict in ("promote", "reject", "inconclusive")
    event(result.verdict)  # --hypothesis-show-statistics: how often each verdict was reached
    if result.verdict != "promote":
        return
    for rule in result.rules:
        assert rule.status == "pass", rule
        assert not isinstance(rule.value, float) or math.isfinite(rule.value), rule
    assert model == "model-f" and prompt_set == "prompts-p" and scores_sha == "scores-s" and production is None
    assert variant == "clear"
    for metric in ("aesthetic", "clip_score"):
        ev = result.evidence[metric]
        assert all(math.isfinite(ev[k]) for k in ("ci_low", "ci_high", "sd_diff", "power")) and ev["power"] >= 0.8
        assert ev["ci_low"] > -getattr(GATE.margins, metric)


# -- training health ---------------------------------------------------------------------------------

HEALTHY = {"final_loss": 0.74, "base_val_loss": 1.13, "saved_val_loss": 0.87}


@pytest.mark.parametrize(
    ("record", "failing"),
    [
        (HEALTHY, {}),
        # The run: 500x the learning rate, held-out loss 1.17 where the base model has 1.13.
        (HEALTHY | {"saved_val_loss": 1.17}, {"val_loss_vs_base": "fail"}),
        (HEALTHY | {"final_loss": math.nan}, {"training_losses_finite": "fail"}),
        (HEALTHY | {"final_loss": "Infinity"}, {"training_losses_finite": "fail"}),
        (HEALTHY | {"base_val_loss": None, "saved_val_loss": None}, {"val_loss_vs_base": "fail"}),  # no held-out set
        (HEALTHY | {"base_val_loss": 0.0}, {"val_loss_vs_base": "fail"}),
        (None, {"training_losses_finite": "fail", "val_loss_vs_base": "fail"}),  # no training record at all
    ],
)
def test_training_health_is_a_gate_input(tmp_path, record, failing):
    """gate.max_val_loss_ratio: the model folder's training record (bound to the model: it is one of its
    files) must show finite losses and held-out loss no worse than the base model's, times the ratio."""
    prompts = write_prompts(tmp_path / "prompts.csv", 12)
    model = make_model(tmp_path / "model")
    if record is not None:
        (model / "easel_train.json").write_text(json.dumps(record))
    write_evaluation(tmp_path / "eval", model, prompts, bootstrap=BOOTSTRAP)
    params = EvaluateParams(
        out_dir=str(tmp_path / "eval"), prompts=str(prompts), seeds=[0, 1], bootstrap={"resamples": 2000}
    )
    e = SimpleNamespace(dir=tmp_path / "eval", model=model, params=params)
    result = decide(e, gate=sdxl_gate_params(max_val_loss_ratio=1.02))
    assert not_passing(result) == failing
    assert result.verdict == ("reject" if failing else "promote")
    if record is HEALTHY:
        assert "held-out loss 0.87 against the base model's 1.13" in note(result, "val_loss_vs_base")
    assert "val_loss_vs_base" not in {r.rule for r in decide(e).rules}  # off unless the ratio is set
