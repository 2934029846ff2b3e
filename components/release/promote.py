"""Promote stage: run the gate, record the decision, and only on a pass publish and move the alias.

`run_gate` decides and records, and changes nothing (the PR eval gate runs it). `run_promote`
runs the same gate, then uploads the model as a registry version and points the alias
(`production`) at it; on a reject it raises GateRejected after writing the record, leaving the
alias untouched.
"""

from __future__ import annotations

from pathlib import Path

from components import report
from components.config import EvaluateParams, GateParams, PromoteParams, StorageParams
from components.plumbing.errors import GateInconclusive, GateRejected
from components.plumbing.fsutil import atomic_write_json, atomic_write_text, model_fingerprint
from components.plumbing.scratch import ScratchDir
from components.release.gate import (
    PASS,
    VERDICT_MEANING,
    decision_markdown,
    decision_record,
    evidence_table_md,
    failed_rules_message,
    gather_inputs,
    judge,
    unchanged_record,
)

COMMENT_MARKER = "<!-- easel-eval-gate -->"


def open_registry(storage: StorageParams, root: Path | None = None):
    from components.release.registry import Registry
    from components.storage import ready_client

    settings, client = ready_client(storage, root)
    return Registry(client, settings, storage.bucket, storage.registry_prefix)


def run_gate(
    gate: GateParams,
    promote: PromoteParams,
    storage: StorageParams,
    evaluate: EvaluateParams,
    model_dir: Path,
    out_dir: Path | None = None,
) -> dict:
    """Decide (without changing anything) and write decision.json / decision.md; returns the decision.

    A model that is production's own (the same fingerprint) is `unchanged`, without reading the
    evaluation: there is no difference to measure, and nothing to publish.
    """
    registry = open_registry(storage)
    alias = registry.alias(promote.model_name, promote.alias)
    problems = registry.check_whole(promote.model_name, alias["version"]) if alias else []
    if alias and not problems and (model_dir / "model_index.json").is_file():
        production = registry.manifest(promote.model_name, alias["version"]) or {}
        decision = unchanged_record(
            model_fingerprint(model_dir),
            alias["version"],
            production.get("model_fingerprint"),
            promote.model_name,
            promote.alias,
        )
        if decision is not None:
            _write(decision, Path(out_dir or promote.out_dir))
            return decision
    eval_dir = Path(evaluate.out_dir)
    inputs = gather_inputs(
        eval_dir / "summary.json",
        eval_dir / "scores.csv",
        model_dir,
        evaluate,
        alias["version"] if alias else None,
        "; ".join(problems[:3]) if problems else None,
    )
    result = judge(inputs, gate, evaluate.bootstrap)
    decision = decision_record(inputs, result, gate, promote.model_name, promote.alias)
    _write(decision, Path(out_dir or promote.out_dir))
    return decision


def raise_unless_promoted(decision: dict, prefix: str) -> None:
    """GateRejected (exit 3) or GateInconclusive (exit 4) with one line of reasons, unless promoted
    (or unchanged: production already is this model)."""
    if decision["verdict"] in ("promote", "unchanged"):
        return
    error = GateInconclusive if decision["verdict"] == "inconclusive" else GateRejected
    raise error(
        f"{prefix} {decision['verdict']}: {VERDICT_MEANING[decision['verdict']]}. {failed_rules_message(decision)}"
    )


def _write(decision: dict, out_dir: Path) -> None:
    atomic_write_json(out_dir / "decision.json", decision)
    atomic_write_text(out_dir / "decision.md", decision_markdown(decision))


def run_promote(
    gate: GateParams,
    promote: PromoteParams,
    storage: StorageParams,
    evaluate: EvaluateParams,
    model_dir: Path,
    extras: dict[str, Path] | None = None,
) -> dict:
    """Gate; on promote publish the model and move the alias. Raises GateRejected / GateInconclusive."""
    decision = run_gate(gate, promote, storage, evaluate, model_dir)
    raise_unless_promoted(decision, f"the gate's verdict on {promote.model_name} ({promote.alias} unchanged) is")
    if decision["verdict"] == "unchanged":
        return decision  # production already is this model: nothing to publish, the alias stays
    registry = open_registry(storage)
    summary_path = Path(evaluate.out_dir) / "summary.json"
    files = {"evaluation_summary.json": summary_path, "decision.json": Path(promote.out_dir) / "decision.json"}
    files |= {name: path for name, path in (extras or {}).items() if path.is_file()}
    with ScratchDir("export") as scratch:
        if promote.export_single_file:  # the same model as one file, beside the folder in the version
            from components.models.single_file import export_single_file

            single = export_single_file(
                model_dir, scratch / f"{promote.model_name}.safetensors", promote.export_single_file
            )
            files |= {p.name: p for p in (single, single.with_suffix(".md")) if p.is_file()}
        manifest = registry.publish(
            promote.model_name,
            model_dir,
            files,
            {
                "model_fingerprint": decision["inputs"]["model_fingerprint"],
                "evaluation_summary_sha256": decision["inputs"]["summary_sha256"],
            },
        )
    alias = registry.set_alias(
        promote.model_name,
        promote.alias,
        manifest["version"],
        "promotion gate passed",
        expected_version=decision["inputs"]["production_version"],
        check_expected=True,
    )
    decision["registry"] = {
        "version": manifest["version"],
        "alias": promote.alias,
        "uri": registry.uri(registry.version_prefix(promote.model_name, manifest["version"])),
        "previous": alias["history"][0]["version"] if alias["history"] else None,
    }
    _write(decision, Path(promote.out_dir))
    return decision


def pr_comment(decision: dict, report_url: str | None = None) -> str:
    """The sticky PR comment: the verdict, the failing rules, the evidence, and the metrics against the reference.

    Everything comes from the decision, whose numbers the gate recomputed and checked; the
    evaluation summary itself is never read here.
    """
    verdict = decision["verdict"]
    reference = decision.get("reference") or "production"
    headline = {
        "promote": "passes the gate",
        "unchanged": "is **unchanged**: it is the model in production, so it passes",
        "reject": "**fails the gate**",
        "inconclusive": "is **inconclusive**",
    }
    lines = [COMMENT_MARKER, f"## Easel eval gate: the candidate {headline[verdict]}", ""]
    lines += [f"Verdict **{verdict}**: {VERDICT_MEANING[verdict]}.", ""]
    failing = [r for r in decision["rules"] if r["status"] != PASS]
    if failing:
        lines += ["Rules that did not pass:", ""]
        lines += [f"- `{r['rule']}` ({r['status']}): {r['note'] or 'see the table below'}" for r in failing]
        lines.append("")
    if decision.get("evidence"):
        lines += [f"Power of the paired prompts against **{reference}**:", "", evidence_table_md(decision), ""]
    metrics = decision.get("metrics") or {}
    new, old = metrics.get("candidate") or {}, metrics.get(reference) or {}
    rows = []
    for metric, stat in (
        ("aesthetic", "mean"),
        ("aesthetic", "std"),
        ("aesthetic", "50%"),
        ("clip_score", "mean"),
        ("clip_score", "std"),
    ):
        a, b = (new.get(metric) or {}).get(stat), (old.get(metric) or {}).get(stat)
        change = a - b if isinstance(a, float) and isinstance(b, float) else None
        rows.append(("evaluate.json", f"{metric}.{stat}", report.fmt(b), report.fmt(a), report.fmt(change)))
    if metrics:
        lines += [
            f"Candidate against **{reference}** (`dvc metrics diff` style, recomputed from scores.csv):",
            "",
            report.table_md(["Path", "Metric", reference, "candidate", "Change"], rows),
            "",
        ]
    lines.append(decision_markdown(decision))
    if report_url:
        lines.append(f"[Evaluation report and images]({report_url})")
    return "\n".join(lines) + "\n"
