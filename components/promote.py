"""Promote stage: the quality gate, its decision record, and publication to the registry.

The gate fails closed: a missing, non-numeric or NaN metric rejects, as does an evaluation of a
different model than the one being promoted. Only when every rule passes is the model uploaded
as a registry version and the alias (`production`) pointed at it; otherwise the alias is left
untouched and the stage exits non-zero with the reasons.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from components import report
from components.config import PromoteParams, StorageParams
from components.errors import GateRejected
from components.evaluate import read_summary
from components.evaluate.models import folder_fingerprint
from components.fsutil import atomic_write_json, atomic_write_text, sha256_file


@dataclass
class RuleResult:
    rule: str
    value: float | str | None
    threshold: float | str
    passed: bool
    note: str = ""


def _number(summary: dict, *keys: str) -> float | None:
    value: object = summary
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def floor_rule(name: str, value: float | None, floor: float) -> RuleResult:
    if value is None:
        return RuleResult(name, None, floor, False, "missing or not a number in the evaluation summary")
    if math.isnan(value):
        return RuleResult(name, value, floor, False, "NaN")
    return RuleResult(name, value, floor, value >= floor)


def gate(summary: dict, params: PromoteParams, fingerprint: str | None) -> list[RuleResult]:
    """Every gate rule, evaluated; the model is promoted only if all pass."""
    rules = [
        floor_rule("aesthetic_mean", _number(summary, "aesthetic", "mean"), params.min_aesthetic_mean),
        floor_rule("clip_score_mean", _number(summary, "clip_score", "mean"), params.min_clip_score_mean),
    ]
    evaluated = summary.get("model_fingerprint")
    if fingerprint is not None:
        same = evaluated == fingerprint
        rules.append(
            RuleResult(
                "evaluated_this_model",
                (evaluated or "missing")[:16],
                fingerprint[:16],
                same,
                "" if same else "the summary is of another model (stale evaluation)",
            )
        )
    return rules


def decision_markdown(decision: dict) -> str:
    verdict = "PROMOTE" if decision["promote"] else "REJECT"
    inputs = decision["inputs"]
    rows = [
        (
            r["rule"],
            report.fmt(r["value"]),
            report.fmt(r["threshold"]),
            "pass" if r["passed"] else "FAIL",
            r["note"],
        )
        for r in decision["rules"]
    ]
    lines = [
        f"## Promotion gate: **{verdict}**",
        "",
        report.table_md(["rule", "value", "threshold", "verdict", "note"], rows),
        "",
        f"- model: `{inputs['model_dir']}` (fingerprint `{inputs['model_fingerprint'][:16]}`)",
        f"- evaluation summary: `{inputs['summary']}` (sha256 `{inputs['summary_sha256'][:16]}`)",
    ]
    if decision.get("registry"):
        reg = decision["registry"]
        lines.append(f"- registry: `{reg['uri']}`, alias `{reg['alias']}` -> `{reg['version']}`")
    return "\n".join(lines) + "\n"


def run_promote(
    params: PromoteParams,
    storage: StorageParams,
    model_dir: Path,
    summary_path: Path,
    extras: dict[str, Path] | None = None,
    root: Path | None = None,
) -> dict:
    """Decide; on a pass publish and move the alias. Raises GateRejected (after writing the record) on a fail."""
    out_dir = Path(params.out_dir)
    summary = read_summary(summary_path)
    fingerprint = folder_fingerprint(model_dir) if (model_dir / "model_index.json").is_file() else None
    rules = gate(summary, params, fingerprint)
    if fingerprint is None:
        rules.append(RuleResult("model_present", str(model_dir), "diffusers folder", False, "no model_index.json"))
    decision = {
        "promote": all(r.passed for r in rules),
        "model_name": params.model_name,
        "alias": params.alias,
        "inputs": {
            "model_dir": str(model_dir),
            "model_fingerprint": fingerprint or "missing",
            "summary": str(summary_path),
            "summary_sha256": sha256_file(summary_path),
        },
        "rules": [asdict(r) for r in rules],
        "registry": None,
    }
    if decision["promote"]:
        from components.registry import Registry
        from components.storage import ready_client

        settings, client = ready_client(storage, root)
        registry = Registry(client, settings, storage.bucket, storage.registry_prefix)
        files = {"evaluation_summary.json": summary_path, **(extras or {})}
        manifest = registry.publish(
            params.model_name,
            model_dir,
            files,
            {
                "model_fingerprint": fingerprint,
                "evaluation": {k: summary.get(k) for k in ("aesthetic", "clip_score")},
            },
        )
        alias = registry.set_alias(params.model_name, params.alias, manifest["version"], "promotion gate passed")
        decision["registry"] = {
            "version": manifest["version"],
            "alias": params.alias,
            "uri": registry.uri(registry.version_prefix(params.model_name, manifest["version"])),
            "previous": alias["history"][0]["version"] if alias["history"] else None,
        }
    atomic_write_json(out_dir / "decision.json", decision)
    atomic_write_text(out_dir / "decision.md", decision_markdown(decision))
    if not decision["promote"]:
        failed = [
            f"{r.rule} = {report.fmt(r.value)} against {report.fmt(r.threshold)}" + (f" ({r.note})" if r.note else "")
            for r in rules
            if not r.passed
        ]
        raise GateRejected(
            f"promote: the gate rejected {params.model_name}; {params.alias} is unchanged. Failed: " + "; ".join(failed)
        )
    return decision
