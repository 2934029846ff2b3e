"""Running the DVC stages from code: what the Prefect flows call, kept out of the flows themselves.

Stages run as `dvc repro --single-item <stage>` in the project folder, so DVC decides what is up
to date and records dvc.lock exactly as a person running `dvc repro` would.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from components import report
from components.config import STAGES
from components.plumbing.errors import TEMPORARY, ConfigError, EaselError
from components.plumbing.numbers import number_at, read_json
from components.plumbing.procs import CommandTimedOut, run_captured

if TYPE_CHECKING:
    from components.shard_exchange import Exchange


@dataclass
class StageRun:
    stage: str
    ran: bool  # False when DVC found it up to date
    returncode: int
    output: str
    verdict: str | None = None  # the promote stage's gate verdict when it did not promote: reject | inconclusive
    shards: list[ShardRun] = field(default_factory=list)  # the shard runs before it, when it was sharded


# The exit codes of `easel promote` that are verdicts, not errors (components.plumbing.errors).
GATE_VERDICTS = {3: "reject", 4: "inconclusive"}


class StageFailed(EaselError):
    """A DVC stage's command failed; `transient` when its own line says so, or a signal killed it."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may pass by itself (retry it); a deterministic one (bad params, bad input, a bug) won't."""
    return isinstance(exc, EaselError) and exc.transient


def check_stages(stages: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order (all six for None); an unknown name is refused before anything runs."""
    if stages is None:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: {', '.join(map(repr, unknown))}: no such stage; stages are {', '.join(STAGES)}")
    if not stages:
        raise ConfigError(f"stages: empty; name at least one of {', '.join(STAGES)} (or none for all six)")
    return [s for s in STAGES if s in stages]


def _env(project_dir: Path | str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The stages' `easel` command lives beside this interpreter (the project's venv).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if project_dir is not None:  # the stages run the project's own code (a scheduled run's fresh checkout)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(project_dir).resolve()), env.get("PYTHONPATH")) if p)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    env["EASEL_NO_PROGRESS"] = "1"
    return env


class StageTimedOut(EaselError, TimeoutError):
    """A stage ran past its time limit (orchestration.stage_timeout_s) and was stopped; Prefect calls it TimedOut."""


def dvc(
    args: list[str], project_dir: Path | str, check: bool = True, timeout_s: float | None = None
) -> subprocess.CompletedProcess:
    try:
        proc = run_captured([sys.executable, "-m", "dvc", *args], project_dir, _env(project_dir), timeout_s)
    except CommandTimedOut as exc:
        raise StageTimedOut(f"{exc} (orchestration.stage_timeout_s, flow_timeout_s)") from None
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        # DVC's own commands (push, pull, status) fail on storage or network trouble: worth a retry.
        raise EaselError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n" + "\n".join(tail), transient=True)
    return proc


def repro_stage(stage: str, project_dir: Path | str, timeout_s: float | None = None) -> StageRun:
    """Reproduce one stage; raises StageFailed with the stage's own message if it fails, StageTimedOut
    (the stage and its processes stopped) if it runs past `timeout_s`."""
    check_stages([stage])
    proc = dvc(["repro", "--single-item", stage], project_dir, check=False, timeout_s=timeout_s)
    output = proc.stdout + proc.stderr
    # DVC reports the command's own status: "failed to run: easel promote, exited with 3".
    status = re.search(r"failed to run: .*, exited with (-?\d+)", output)
    code = int(status.group(1)) if status else None
    if proc.returncode != 0 and stage == "promote" and code in GATE_VERDICTS:
        return StageRun(stage, True, code, output, GATE_VERDICTS[code])
    if proc.returncode != 0:
        # The stage's own `easel ...: error:` line says what is wrong; show it first.
        lines = output.strip().splitlines()
        ours = [line for line in lines if line.startswith("easel ")]
        killed = code is not None and (code < 0 or code > 128)  # a signal (OOM killer, a node going away)
        raise StageFailed(
            f"stage {stage} failed: " + ("\n".join(ours) if ours else "\n".join(lines[-15:])),
            transient=killed or any(line.endswith(TEMPORARY) for line in ours),
        )
    return StageRun(stage, f"Running stage '{stage}'" in output, proc.returncode, output)


# The stages whose per-item work can be split into shards (components.sharding): `easel <stage>
# --shard K/N` fills the stage's cache, then the DVC stage finds everything done and writes the outputs.
SHARDED_STAGES = ("download", "validate", "caption", "evaluate")


@dataclass
class ShardRun:
    stage: str
    shard: int
    shards: int
    summary: str  # the shard's own line: how many items, how many computed now
    worker: str  # host:pid of the process that ran it (a Dask worker, say)
    folder: str = ""  # the shard's own folder there (deleted when it ended)
    handed_back: int = 0  # cache files it put in the exchange for the merge


def run_stage_shard(
    stage: str, shard: int, shards: int, exchange: Exchange, timeout_s: float | None = None
) -> ShardRun:
    """Shard K of N of a stage's work, in a fresh folder of its own holding the stage's inputs from
    the exchange (components.shard_exchange); the cache files it writes go back there. No stage
    output is written, and nothing of the project's own folder is read."""
    from components.shard_exchange import HANDED_IMAGES, publish_shard_results, shard_folder

    if stage not in SHARDED_STAGES:
        raise EaselError(f"stage {stage} cannot be sharded; these can: {', '.join(SHARDED_STAGES)}")
    # The DVC stage writes download's manifest; a validate shard inspects the files the flow handed it.
    only = {"download": ["--no-manifest"], "validate": ["--archived", HANDED_IMAGES]}.get(stage, [])
    command = [str(Path(sys.executable).parent / "easel"), stage, "--shard", f"{shard}/{shards}", *only]
    with shard_folder(exchange, stage, shard, shards) as folder:
        env = _env(folder)  # the folder's own code (the stage's code dependencies) runs, as in the project
        # Shards on one machine each run the thread count a single process would (the same numbers,
        # to the last bit), so they share cores: OpenMP threads that wait by spinning then burn the
        # cores the others need (caption cost 4.9x the single process's CPU). Waiting asleep does not.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            proc = run_captured(command, folder, env, timeout_s)
        except CommandTimedOut as exc:
            raise StageTimedOut(f"{stage} shard {shard}/{shards}: {exc} (orchestration.stage_timeout_s)") from None
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            killed = proc.returncode < 0 or proc.returncode > 128
            raise StageFailed(
                f"{stage} shard {shard}/{shards} failed: " + "\n".join(lines[-10:]),
                transient=killed or any(line.endswith(TEMPORARY) for line in lines),
            )
        handed_back = publish_shard_results(exchange, stage, shard, shards, folder)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return ShardRun(stage, shard, shards, summary, worker, str(folder), handed_back)


def orchestration_params(project_dir: Path | str):
    """The `orchestration` section of the project's params (timeouts, retries, the Prefect server)."""
    from components.config import load_params

    return load_params(Path(project_dir) / "params.yaml").orchestration


def stage_is_current(stage: str, project_dir: Path | str) -> bool:
    """Whether DVC would skip the stage (its inputs, parameters and code unchanged): no shard needs to run."""
    return dvc(["status", "--quiet", stage], project_dir, check=False).returncode == 0


def prepare_project(project_dir: Path | str) -> str:
    """What a run needs before its stages: the tiny models (tiny profile) and the S3 storage with
    DVC's remote pointed at it (starting the embedded server if it is the endpoint)."""
    from components.config import load_params
    from components.models.loaders import TINY_ROOT
    from components.models.tiny import build_tiny_models
    from components.storage import configure_dvc_remote, ready_client

    project_dir = Path(project_dir)
    params = load_params(project_dir / "params.yaml")
    if params.profile == "tiny":  # built, not downloaded: a fresh checkout makes its own (idempotent)
        build_tiny_models(project_dir / TINY_ROOT)
    settings, _ = ready_client(params.storage, project_dir, start_embedded=True)
    configure_dvc_remote(project_dir, params.storage, settings)
    return settings.endpoint_url or "aws"


def git(args: list[str], project_dir: Path | str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EaselError(f"`git {' '.join(args)}` failed (exit {proc.returncode}): {detail[0]}")
    return proc.stdout.strip()


# What a run changes that git tracks: the lock, DVC's .gitignore entries, and the cache: false
# outputs (metrics, plots, the leaderboard, the decision record) under data/.
RESULT_PATHS = ["dvc.lock", "data", ":(glob)**/.gitignore"]


def record_results(project_dir: Path | str, name: str, message: str, prefix: str) -> str | None:
    """Commit what the run changed that git tracks, as a new branch `<prefix>/<name>/<time>` pushed to `origin`.

    The outputs themselves must already be in the DVC remote (`dvc push`): with the branch, anyone
    with the repository can `git fetch origin <branch>` and `dvc pull` exactly this run's results.
    Returns the branch, or None when the run changed nothing (every stage was up to date).
    """
    if not git(["status", "--porcelain", "--", *RESULT_PATHS], project_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    branch = f"{prefix}/{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'run'}/{stamp}"
    identity = [] if git(["config", "user.email"], project_dir, check=False) else [
        "-c", "user.name=Easel scheduled run", "-c", "user.email=easel@localhost"
    ]  # fmt: skip
    git(["checkout", "--detach"], project_dir)  # the branch the run started from stays as it was
    git(["add", "--all", "--", *RESULT_PATHS], project_dir)
    git([*identity, "commit", "--quiet", "-m", message], project_dir)
    git(["push", "origin", f"HEAD:refs/heads/{branch}"], project_dir)
    return branch


def missing_outputs(project_dir: Path | str, stages: list[str]) -> list[str]:
    """What `dvc.lock` records for these stages that this folder lacks: their outputs, and their
    inputs that are other stages' outputs (a cold work folder, a new pod: a fresh clone with the
    last run's dvc.lock). Outputs DVC does not cache (metrics, the leaderboard) travel by git."""
    import yaml

    lock_file = Path(project_dir) / "dvc.lock"
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except FileNotFoundError:
        return []
    except (OSError, yaml.YAMLError) as exc:
        raise EaselError(f"{lock_file}: cannot be read ({str(exc).splitlines()[0]})") from None
    recorded = lock.get("stages") or {}
    cached = {
        out["path"]: name
        for name, entry in recorded.items()
        for out in (entry or {}).get("outs") or []
        if out.get("cache", True) is not False and "path" in out
    }
    wanted = []
    for stage in stages:
        entry = recorded.get(stage) or {}
        wanted += [out["path"] for out in entry.get("outs") or [] if out.get("path") in cached]
        wanted += [dep["path"] for dep in entry.get("deps") or [] if cached.get(dep.get("path"), stage) != stage]
    return sorted({path for path in wanted if not (Path(project_dir) / path).exists()})


def dvc_pull(project_dir: Path | str, paths: list[str], timeout_s: float | None = None) -> str:
    """Pull these outputs from the DVC remote (what is not there is left missing: DVC reruns its stage)."""
    lines = dvc(["pull", "--allow-missing", *paths], project_dir, timeout_s=timeout_s).stdout.strip().splitlines()
    return lines[-1] if lines else ""


def dvc_push(project_dir: Path | str, timeout_s: float | None = None) -> str:
    """Push every tracked output to the DVC remote; returns DVC's last line (e.g. "12 files pushed")."""
    lines = dvc(["push"], project_dir, timeout_s=timeout_s).stdout.strip().splitlines()
    return lines[-1] if lines else ""


def read_metrics(project_dir: Path | str) -> dict[str, object]:
    """Each stage's metrics file as parsed JSON (any shape: read values through components.plumbing.numbers)."""
    from components.config import reporting_params

    folder = Path(project_dir) / reporting_params(Path(project_dir) / "params.yaml").metrics_dir
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
    rows = [
        (
            r.stage,
            (f"gate verdict: {r.verdict}" if r.verdict else status[r.ran])
            + (f", after {len(r.shards)} shards on {len({s.worker for s in r.shards})} workers" if r.shards else ""),
        )
        for r in runs
    ]
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


@dataclass
class ReportArtifact:
    key: str  # a Prefect artifact key: lowercase letters, digits and dashes
    markdown: str
    description: str


def report_artifacts(project_dir: Path | str) -> list[ReportArtifact]:
    """The stages' reports as a run shows them: the evaluation report and the gate's decision in
    Markdown, and a table linking every HTML report (validation, captions, evaluation) in the folder."""
    from components.config import load_params

    project_dir = Path(project_dir).resolve()
    params = load_params(project_dir / "params.yaml")
    artifacts = []
    markdown = [
        ("easel-evaluation-report", Path(params.evaluate.out_dir) / "report.md", "Evaluation: scores and comparisons"),
        ("easel-gate-decision", Path(params.promote.out_dir) / "decision.md", "Promotion gate: rules and verdict"),
    ]
    for key, path, description in markdown:
        if (project_dir / path).is_file():
            text = (project_dir / path).read_text(encoding="utf-8", errors="replace")
            artifacts.append(ReportArtifact(key, text[:MAX_ARTIFACT_CHARS], f"{description} ({path})"))
    html = [
        ("validation", Path(params.validate_.out_dir) / "report.html"),
        ("captions", Path(params.caption.out_dir) / "report.html"),
        ("evaluation", Path(params.evaluate.out_dir) / "report.html"),
    ]
    rows = [
        (name, f"[{path}]({(project_dir / path).as_uri()})") for name, path in html if (project_dir / path).is_file()
    ]
    if rows:
        table = report.table_md(["report", "file on the machine that ran the flow"], rows)
        artifacts.append(ReportArtifact("easel-reports", f"# Easel reports\n\n{table}\n", "Links to the HTML reports"))
    return artifacts


MAX_ARTIFACT_CHARS = 200_000  # a report is a page, not a data set: the rest stays in the file
