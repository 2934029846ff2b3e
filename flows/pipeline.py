"""The Easel pipeline as a Prefect flow: one task per DVC stage, then `dvc push`, then (scheduled
runs) the results recorded as a git branch.

Runs against the project's local Prefect server (`easel prefect start`, or any PREFECT_API_URL),
or with no server at all (Prefect starts a temporary one). Deployed on a schedule through
prefect.yaml, whose pull step (flows/workspace.py) fetches the code into the work folder, carries
the last run's results onto it, and holds the folder for the run.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from components.config import StageName
from components.pipeline import (
    SHARDED_STAGES,
    ShardRun,
    StageRun,
    check_stages,
    dvc_pull,
    dvc_push,
    is_transient,
    missing_outputs,
    orchestration_params,
    prepare_project,
    record_results,
    report_artifacts,
    repro_stage,
    run_stage_shard,
    run_summary_markdown,
    stage_is_current,
)
from components.plumbing.errors import EaselError
from components.shard_exchange import (
    Exchange,
    close_exchange,
    collect_shard_results,
    open_exchange,
    publish_stage_inputs,
)
from flows import workspace


def transient_only(task, task_run, state) -> bool:
    """Retry a task only after a failure that may pass by itself (storage that did not answer, a
    killed process); bad params, bad input and bugs fail the same way every time."""
    return isinstance(state.data, BaseException) and is_transient(state.data)


@task(name="prepare-project", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def prepare(project_dir: str) -> str:
    """The tiny models (tiny profile) and the S3 storage, with DVC's remote pointed at it."""
    return prepare_project(project_dir)


@task(name="dvc-pull", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def pull(project_dir: str, paths: list[str], timeout_s: float) -> str:
    """What a cold work folder lacks of the last run's outputs, from the DVC remote."""
    return dvc_pull(project_dir, paths, timeout_s)


@task(name="dvc-stage", retry_delay_seconds=10, retry_condition_fn=transient_only)
def run_stage(stage: str, project_dir: str, timeout_s: float) -> StageRun:
    logger = get_run_logger()
    result = repro_stage(stage, project_dir, timeout_s)
    logger.info("%s: %s", stage, "ran" if result.ran else "up to date")
    return result


@task(name="shard-inputs", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def hand_out(exchange: Exchange, stage: str, project_dir: str, shards: int) -> int:
    """What the stage's shards read, into the run's exchange in S3."""
    return publish_stage_inputs(exchange, stage, project_dir, shards)


@task(name="stage-shard", retry_delay_seconds=10, retry_condition_fn=transient_only)
def run_shard(stage: str, shard: int, shards: int, exchange: Exchange, timeout_s: float) -> ShardRun:
    """One shard of a stage's work, on whichever worker the flow's task runner picks (a Dask worker),
    in a folder of its own: its inputs and results go through S3 (components.shard_exchange)."""
    return run_stage_shard(stage, shard, shards, exchange, timeout_s)


@task(name="shard-results", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def hand_in(exchange: Exchange, stage: str, shards: int, project_dir: str) -> int:
    """Every shard's results from the exchange into the project's caches, for the DVC stage."""
    return collect_shard_results(exchange, stage, shards, project_dir)


@task(name="dvc-push", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def push(project_dir: str, timeout_s: float) -> str:
    return dvc_push(project_dir, timeout_s)


@task(name="record-results", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
def record_run(project_dir: str, runs: list[StageRun]) -> str | None:
    name = runtime.deployment.name or runtime.flow_run.name or "manual"
    ran = ", ".join(r.stage for r in runs if r.ran) or "none"
    verdict = next(
        (r.verdict for r in runs if r.verdict), "promote" if any(r.stage == "promote" for r in runs) else "-"
    )
    message = f"easel: results of {name} ({runtime.flow_run.name}); stages run: {ran}; gate: {verdict}"
    return record_results(project_dir, name, message, workspace.RESULTS_PREFIX)


# A gate that does not promote is an outcome of the run, not a failure of it.
VERDICT_STATES = {"reject": "Rejected", "inconclusive": "Inconclusive"}


@flow(name="easel-pipeline", log_prints=True)
def easel_pipeline(
    stages: list[StageName] | None = None,
    project_dir: str = ".",
    push_to_remote: bool = True,
    record: bool = False,
    shards: int = 1,
) -> list[StageRun] | State:
    """Run the chosen stages (default: all six, in order) and push the results to the DVC remote.

    An unknown stage name is refused before anything runs. A stage's time limit and retries come
    from `orchestration` in params.yaml; only temporary failures are retried.

    With `shards` > 1, the heavy stages (download, validate, caption, evaluate's generation) that
    DVC would rerun are first split into that many shards, mapped over the flow's task runner
    (threads by default; Dask workers in flows/on_dask.py); then the DVC stage merges them.

    With `record` (the scheduled deployments), what the run changed that git tracks (dvc.lock,
    metrics, the leaderboard, the decision) is committed as a branch `easel/runs/<deployment>/<time>`
    pushed to the repository's origin, once its outputs are in the DVC remote; a run that changed
    nothing records nothing.
    Ends Completed when the gate promotes (or is not run), in a Completed state named Rejected or
    Inconclusive when it does not, Failed on an error and TimedOut past its time limit.
    """
    project_dir = str(Path(project_dir).resolve())
    with workspace.held(project_dir):  # one run at a time in this folder (the pull step may hold it already)
        return _run(stages, project_dir, push_to_remote, record, shards)


def _run(
    stages: list[str] | None, project_dir: str, push_to_remote: bool, record_branch: bool, shards: int
) -> list | State:
    runs: list[StageRun] = []
    failure, branch = None, None
    exchange: Exchange | None = None  # where shards swap files: opened by the first sharded stage
    try:
        chosen = check_stages(stages)
        settings = orchestration_params(project_dir)
        deadline = time.monotonic() + settings.flow_timeout_s

        def time_left(stage: str | None = None) -> float:
            """A step's time limit: its own, within what is left of the run's."""
            left = deadline - time.monotonic()
            return max(1.0, min(settings.stage_timeout(stage), left) if stage else left)

        prepare(project_dir)
        cold = missing_outputs(project_dir, chosen)
        if cold:
            print(f"dvc pull (cold work folder: {', '.join(cold)}): {pull(project_dir, cold, time_left())}")
        for stage in chosen:
            retries = settings.retries.get(stage, 0)
            shard_runs: list[ShardRun] = []
            if shards > 1 and stage in SHARDED_STAGES and not stage_is_current(stage, project_dir):
                exchange = exchange or open_exchange(project_dir)
                handed_out = hand_out(exchange, stage, project_dir, shards)
                print(f"{stage}: {handed_out} input files handed out to {shards} shards")
                shard_task = run_shard.with_options(name=f"{stage}-shard", retries=retries)
                # Every shard must finish: .result() raises the first failure, and the stage does not run.
                shard_runs = shard_task.map(
                    unmapped(stage), range(shards), unmapped(shards), unmapped(exchange), unmapped(time_left(stage))
                )
                shard_runs = shard_runs.result()
                for shard in shard_runs:
                    print(f"{shard.stage} shard {shard.shard}/{shard.shards} on {shard.worker}: {shard.summary}")
                print(f"{stage}: {hand_in(exchange, stage, shards, project_dir)} files handed in by its shards")
            task_for_stage = run_stage.with_options(name=f"stage-{stage}", retries=retries)
            result = task_for_stage(stage, project_dir, time_left(stage))
            result.shards = shard_runs
            runs.append(result)
        if push_to_remote:
            print(f"dvc push: {push(project_dir, time_left())}")
            if record_branch:
                branch = record_run(project_dir, runs)
                print(f"results: {f'branch {branch} pushed to origin' if branch else 'nothing changed, no branch'}")
    except BaseException as exc:
        failure = str(exc) or type(exc).__name__
        raise
    finally:
        if exchange:  # the shards' files are in the project's caches now, or the run failed: delete them
            try:
                close_exchange(exchange)
            except EaselError as exc:
                print(f"the shard exchange s3://{exchange.bucket}/{exchange.prefix} is left behind: {exc}")
        markdown = run_summary_markdown(project_dir, runs, failure)
        if branch:
            markdown += f"\nResults: `git fetch origin {branch}` then `dvc pull` ({Path(project_dir).name}).\n"
        create_markdown_artifact(
            key="easel-run-summary",
            markdown=markdown,
            description="Easel pipeline run: stages, key metrics, promotion decision",
        )
        if runs:
            for artifact in report_artifacts(project_dir):
                create_markdown_artifact(key=artifact.key, markdown=artifact.markdown, description=artifact.description)
    verdict = next((r.verdict for r in runs if r.verdict), None)
    if verdict:
        return Completed(
            name=VERDICT_STATES[verdict],
            message=f"gate verdict: {verdict}; production is unchanged (see data/promote/decision.md)",
            data=runs,
        )
    return runs


if __name__ == "__main__":
    from components.prefect_server import local_server

    with local_server() as ui:
        if ui:
            print(f"Prefect UI: {ui}")
        easel_pipeline()
