"""Promote stage: run the gate, record the decision, and only on a pass publish and move the alias.

`run_gate` decides and records, and changes nothing (the PR eval gate runs it). `run_promote`
runs the same gate, then uploads the model as a registry version and points the alias
(`production`) at it; on a reject it raises GateRejected after writing the record, leaving the
alias untouched.
"""

from __future__ import annotations

from pathlib import Path

from components import report
from components.config import GateParams, PromoteParams, StorageParams
from components.errors import GateRejected
from components.fsutil import atomic_write_json, atomic_write_text
from components.gate import (
    decision_markdown,
    decision_record,
    evaluate_gate,
    failed_rules_message,
    gather_inputs,
)

COMMENT_MARKER = "<!-- easel-eval-gate -->"


def open_registry(storage: StorageParams, root: Path | None = None):
    from components.registry import Registry
    from components.storage import ready_client

    settings, client = ready_client(storage, root)
    return Registry(client, settings, storage.bucket, storage.registry_prefix)


def run_gate(
    gate: GateParams,
    promote: PromoteParams,
    storage: StorageParams,
    model_dir: Path,
    eval_dir: Path,
    prompts_path: Path,
    out_dir: Path | None = None,
) -> dict:
    """Decide (without changing anything) and write decision.json / decision.md; returns the decision."""
    registry = open_registry(storage)
    alias = registry.alias(promote.model_name, promote.alias)
    inputs = gather_inputs(
        eval_dir / "summary.json", eval_dir / "scores.csv", model_dir, prompts_path, alias["version"] if alias else None
    )
    rules, reference = evaluate_gate(inputs, gate)
    decision = decision_record(inputs, rules, reference, promote.model_name, promote.alias)
    _write(decision, Path(out_dir or promote.out_dir))
    return decision


def _write(decision: dict, out_dir: Path) -> None:
    atomic_write_json(out_dir / "decision.json", decision)
    atomic_write_text(out_dir / "decision.md", decision_markdown(decision))


def run_promote(
    gate: GateParams,
    promote: PromoteParams,
    storage: StorageParams,
    model_dir: Path,
    eval_dir: Path,
    prompts_path: Path,
    extras: dict[str, Path] | None = None,
) -> dict:
    """Gate; on a pass publish the model and move the alias. Raises GateRejected on a fail."""
    decision = run_gate(gate, promote, storage, model_dir, eval_dir, prompts_path)
    if not decision["promote"]:
        raise GateRejected(
            f"promote: the gate rejected {promote.model_name}; {promote.alias} is unchanged. Failed: "
            + failed_rules_message(decision)
        )
    registry = open_registry(storage)
    summary_path = eval_dir / "summary.json"
    files = {"evaluation_summary.json": summary_path, "decision.json": Path(promote.out_dir) / "decision.json"}
    files |= {name: path for name, path in (extras or {}).items() if path.is_file()}
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


def pr_comment(decision: dict, summary: dict, report_url: str | None = None) -> str:
    """The sticky PR comment: metrics against production, the paired comparison, the gate's rules."""
    verdict = "passes the gate" if decision["promote"] else "**fails the gate**"
    reference = decision.get("reference") or "production"
    lines = [COMMENT_MARKER, f"## Easel eval gate: the candidate {verdict}", ""]
    other = (summary.get("models") or {}).get(reference)
    rows = []
    for metric, stat in (
        ("aesthetic", "mean"),
        ("aesthetic", "std"),
        ("aesthetic", "50%"),
        ("clip_score", "mean"),
        ("clip_score", "std"),
    ):
        new = (summary.get(metric) or {}).get(stat)
        old = (other or {}).get(metric, {}).get(stat) if other else None
        change = new - old if isinstance(new, int | float) and isinstance(old, int | float) else None
        rows.append(
            (
                "data/metrics/evaluate.json",
                f"{metric}.{stat}",
                report.fmt(old) if old is not None else "-",
                report.fmt(new) if new is not None else "-",
                report.fmt(change) if change is not None else "-",
            )
        )
    lines += [
        f"Candidate against **{reference}** (`dvc metrics diff` style):",
        "",
        report.table_md(["Path", "Metric", reference, "candidate", "Change"], rows),
        "",
    ]
    comparison = (summary.get("comparisons") or {}).get(f"vs_{reference}")
    if comparison:
        lines += [
            f"Paired by prompt, {comparison.get('confidence', 0.95):.0%} bootstrap CI of candidate - {reference}:",
            "",
        ]
        lines.append(report.comparison_table_md(comparison))
        lines.append("")
    lines.append(decision_markdown(decision))
    if report_url:
        lines.append(f"[Evaluation report and images]({report_url})")
    return "\n".join(lines) + "\n"
