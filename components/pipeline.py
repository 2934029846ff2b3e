"""Running the DVC stages from code: what the Prefect flows call, kept out of the flows themselves.

Stages run as `dvc repro --single-item <stage>` in the project folder, so DVC decides what is up
to date and records dvc.lock exactly as a person running `dvc repro` would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from components import report
from components.errors import EaselError
from components.numbers import number_at, read_json

STAGES = ("download", "validate", "caption", "train", "evaluate", "promote")
METRICS_DIR = Path("data/metrics")


@dataclass
class StageRun:
    stage: str
    ran: bool  # False when DVC found it up to date
    returncode: int
    output: str
    verdict: str | None = None  # the promote stage's gate verdict when it did not promote: reject | inconclusive


# The exit codes of `easel promote` that are verdicts, not errors (components.errors).
GATE_VERDICTS = {3: "reject", 4: "inconclusive"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The stages' `easel` command lives beside this interpreter (the project's venv).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    env["EASEL_NO_PROGRESS"] = "1"
    return env


def dvc(args: list[str], project_dir: Path | str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project_dir,
        env=_env(),
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise EaselError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return proc


def repro_stage(stage: str, project_dir: Path | str) -> StageRun:
    """Reproduce one stage; raises EaselError with the stage's own message if it fails."""
    if stage not in STAGES:
        raise EaselError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    proc = dvc(["repro", "--single-item", stage], project_dir, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and stage == "promote":
        # DVC reports the command's own status: "failed to run: easel promote, exited with 3".
        status = re.search(r"failed to run: .*, exited with (\d+)", output)
        verdict = GATE_VERDICTS.get(int(status.group(1))) if status else None
        if verdict:
            return StageRun(stage, True, int(status.group(1)), output, verdict)
    if proc.returncode != 0:
        # The stage's own `easel ...: error:` line says what is wrong; show it first.
        lines = output.strip().splitlines()
        ours = [line for line in lines if line.startswith("easel ")]
        raise EaselError(f"stage {stage} failed: " + ("\n".join(ours) if ours else "\n".join(lines[-15:])))
    return StageRun(stage, f"Running stage '{stage}'" in output, proc.returncode, output)


def fetch_download_shard(shard: int, shards: int, project_dir: Path | str) -> str:
    """Fetch one shard of the download stage's URLs (no manifest); returns the stage's summary line."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "easel"), "download", "--shard", f"{shard}/{shards}", "--no-manifest"],
        cwd=project_dir,
        env=_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        raise EaselError(f"download shard {shard}/{shards} failed: " + "\n".join(lines[-10:]))
    return proc.stdout.strip().splitlines()[-1]


def dvc_push(project_dir: Path | str) -> str:
    """Push every tracked output to the DVC remote; returns DVC's last line (e.g. "12 files pushed")."""
    lines = dvc(["push"], project_dir).stdout.strip().splitlines()
    return lines[-1] if lines else ""


def read_metrics(project_dir: Path | str) -> dict[str, object]:
    """Each stage's metrics file as parsed JSON (any shape: read values through components.numbers)."""
    folder = Path(project_dir) / METRICS_DIR
    metrics = {}
    for stage in STAGES:
        value, problem = read_json(folder / f"{stage}.json")
        if problem is None:
            metrics[stage] = value
    return metrics


def run_summary_markdown(project_dir: Path | str, runs: list[StageRun], failure: str | None = None) -> str:
    """A Markdown summary of a pipeline run: what ran, key metrics, the gate's decision."""
    project_dir = Path(project_dir)
    metrics = read_metrics(project_dir)
    lines = ["# Easel pipeline run", ""]
    status = {True: "ran", False: "up to date"}
    rows = [(r.stage, f"gate verdict: {r.verdict}" if r.verdict else status[r.ran]) for r in runs]
    lines.append(report.table_md(["stage", "status"], rows))
    if failure:
        lines += ["", f"**Failed:** {failure}"]

    def value(stage: str, dotted: str) -> str:
        number, problem = number_at(metrics.get(stage), dotted)
        return report.fmt(number) if problem is None else "-"

    key = []
    if "download" in metrics:
        key.append(("download: distinct images", value("download", "distinct_images")))
    if "validate" in metrics:
        key.append(
            ("validate: accepted / rejected", f"{value('validate', 'accepted')} / {value('validate', 'rejected')}")
        )
    if "train" in metrics:
        key.append(("train: steps, final loss", f"{value('train', 'steps')}, {value('train', 'final_loss')}"))
    if "evaluate" in metrics:
        key.append(("evaluate: aesthetic mean", value("evaluate", "aesthetic.mean")))
        key.append(("evaluate: CLIP score mean", value("evaluate", "clip_score.mean")))
    if key:
        lines += ["", report.table_md(["metric", "value"], key)]
    decision = project_dir / "data/promote/decision.md"
    if decision.is_file():
        lines += ["", decision.read_text()]
    return "\n".join(lines) + "\n"
