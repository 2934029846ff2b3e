"""The Easel pipeline as a Prefect flow: one task per DVC stage, then `dvc push`, then (scheduled
runs) the results recorded as a git branch.

Runs with no server (Prefect starts a temporary local one) or against `prefect server start`
(set PREFECT_API_URL). Deployed on a schedule through prefect.yaml, whose pull step
(flows/workspace.py) fetches the code into the work folder and holds it for the run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, runtime, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from components.config import STAGES
from components.pipeline import (
    SHARDED_STAGES,
    ShardRun,
    StageRun,
    dvc_push,
    prepare_project,
    record_results,
    repro_stage,
    run_stage_shard,
    run_summary_markdown,
    stage_is_current,
)
from flows import workspace

# Only the network-bound stage is worth retrying: it resumes where it stopped.
RETRIES = {"download": 2}


@task(name="prepare-project", retries=2, retry_delay_seconds=5)
def prepare(project_dir: str) -> str:
    """The tiny models (tiny profile) and the S3 storage, with DVC's remote pointed at it."""
    return prepare_project(project_dir)


@task(name="dvc-stage")
def run_stage(stage: str, project_dir: str) -> StageRun:
    logger = get_run_logger()
    result = repro_stage(stage, project_dir)
    logger.info("%s: %s", stage, "ran" if result.ran else "up to date")
    return result


@task(name="stage-shard", retry_delay_seconds=10)
def run_shard(stage: str, shard: int, shards: int, project_dir: str) -> ShardRun:
    """One shard of a stage's work, on whichever worker the flow's task runner picks (a Dask worker)."""
    return run_stage_shard(stage, shard, shards, project_dir)


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push(project_dir: str) -> str:
    return dvc_push(project_dir)


@task(name="record-results", retries=2, retry_delay_seconds=10)
def record_run(project_dir: str, runs: list[StageRun]) -> str | None:
    name = runtime.deployment.name or runtime.flow_run.name or "manual"
    ran = ", ".join(r.stage for r in runs if r.ran) or "none"
    verdict = next(
        (r.verdict for r in runs if r.verdict), "promote" if any(r.stage == "promote" for r in runs) else "-"
    )
    message = f"easel: results of {name} ({runtime.flow_run.name}); stages run: {ran}; gate: {verdict}"
    return record_results(project_dir, name, message)


# A gate that does not promote is an outcome of the run, not a failure of it.
VERDICT_STATES = {"reject": "Rejected", "inconclusive": "Inconclusive"}


@flow(name="easel-pipeline", log_prints=True)
def easel_pipeline(
    stages: list[str] | None = None,
    project_dir: str = ".",
    push_to_remote: bool = True,
    record: bool = False,
    shards: int = 1,
) -> list[StageRun] | State:
    """Run the chosen stages (default: all six, in order) and push the results to the DVC remote.

    With `shards` > 1, the heavy stages (download, validate, caption, evaluate's generation) that
    DVC would rerun are first split into that many shards, mapped over the flow's task runner
    (threads by default; Dask workers in flows/on_dask.py); then the DVC stage merges them.

    With `record` (the scheduled deployments), what the run changed that git tracks (dvc.lock,
    metrics, the decision) is committed as a branch `easel/runs/<deployment>/<time>` pushed to the
    repository's origin, once its outputs are in the DVC remote.
    Ends Completed when the gate promotes (or is not run), in a Completed state named Rejected or
    Inconclusive when it does not, and Failed only on an error.
    """
    project_dir = str(Path(project_dir).resolve())
    with workspace.held(project_dir):  # one run at a time in this folder (the pull step may hold it already)
        return _run(stages, project_dir, push_to_remote, record, shards)


def _run(
    stages: list[str] | None, project_dir: str, push_to_remote: bool, record_branch: bool, shards: int
) -> list | State:
    prepare(project_dir)
    runs: list[StageRun] = []
    failure, branch = None, None
    try:
        for stage in [s for s in STAGES if s in (stages or STAGES)]:
            shard_runs: list[ShardRun] = []
            if shards > 1 and stage in SHARDED_STAGES and not stage_is_current(stage, project_dir):
                shard_task = run_shard.with_options(name=f"{stage}-shard", retries=RETRIES.get(stage, 0))
                # Every shard must finish: .result() raises the first failure, and the stage does not run.
                shard_runs = shard_task.map(unmapped(stage), range(shards), unmapped(shards), unmapped(project_dir))
                shard_runs = shard_runs.result()
                for shard in shard_runs:
                    print(f"{shard.stage} shard {shard.shard}/{shard.shards} on {shard.worker}: {shard.summary}")
            task_for_stage = run_stage.with_options(name=f"stage-{stage}", retries=RETRIES.get(stage, 0))
            result = task_for_stage(stage, project_dir)
            result.shards = shard_runs
            runs.append(result)
        if push_to_remote:
            print(f"dvc push: {push(project_dir)}")
            if record_branch:
                branch = record_run(project_dir, runs)
                print(f"results: {f'branch {branch} pushed to origin' if branch else 'nothing changed, no branch'}")
    except Exception as exc:
        failure = str(exc)
        raise
    finally:
        markdown = run_summary_markdown(project_dir, runs, failure)
        if branch:
            markdown += f"\nResults: `git fetch origin {branch}` then `dvc pull` ({Path(project_dir).name}).\n"
        create_markdown_artifact(
            key="easel-run-summary",
            markdown=markdown,
            description="Easel pipeline run: stages, key metrics, promotion decision",
        )
    verdict = next((r.verdict for r in runs if r.verdict), None)
    if verdict:
        return Completed(
            name=VERDICT_STATES[verdict],
            message=f"gate verdict: {verdict}; production is unchanged (see data/promote/decision.md)",
            data=runs,
        )
    return runs


if __name__ == "__main__":
    easel_pipeline()
