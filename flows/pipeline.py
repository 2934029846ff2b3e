"""The Easel pipeline as a Prefect flow: one task per DVC stage, then `dvc push`.

Runs with no server (Prefect starts a temporary local one) or against `prefect server start`
(set PREFECT_API_URL). Deployed on a schedule through prefect.yaml.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from components.config import load_params
from components.pipeline import STAGES, StageRun, dvc_push, repro_stage, run_summary_markdown
from components.storage import configure_dvc_remote, ready_client

# Only the network-bound stage is worth retrying: it resumes where it stopped.
RETRIES = {"download": 2}


@task(name="prepare-storage", retries=2, retry_delay_seconds=5)
def prepare_storage(project_dir: str) -> str:
    """Check the S3 endpoint (starting the embedded one if it is the endpoint) and point DVC at it."""
    params = load_params(Path(project_dir) / "params.yaml")
    settings, _ = ready_client(params.storage, Path(project_dir), start_embedded=True)
    configure_dvc_remote(Path(project_dir), params.storage, settings)
    return settings.endpoint_url or "aws"


@task(name="dvc-stage")
def run_stage(stage: str, project_dir: str) -> StageRun:
    logger = get_run_logger()
    result = repro_stage(stage, project_dir)
    logger.info("%s: %s", stage, "ran" if result.ran else "up to date")
    return result


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push(project_dir: str) -> str:
    return dvc_push(project_dir)


# A gate that does not promote is an outcome of the run, not a failure of it.
VERDICT_STATES = {"reject": "Rejected", "inconclusive": "Inconclusive"}


@flow(name="easel-pipeline", log_prints=True)
def easel_pipeline(
    stages: list[str] | None = None, project_dir: str = ".", push_to_remote: bool = True
) -> list[StageRun] | State:
    """Run the chosen stages (default: all six, in order) and push the results to the DVC remote.

    Ends Completed when the gate promotes (or is not run), in a Completed state named Rejected or
    Inconclusive when it does not, and Failed only on an error.
    """
    project_dir = str(Path(project_dir).resolve())
    prepare_storage(project_dir)
    runs: list[StageRun] = []
    failure = None
    try:
        for stage in [s for s in STAGES if s in (stages or STAGES)]:
            task_for_stage = run_stage.with_options(name=f"stage-{stage}", retries=RETRIES.get(stage, 0))
            runs.append(task_for_stage(stage, project_dir))
        if push_to_remote:
            print(f"dvc push: {push(project_dir)}")
    except Exception as exc:
        failure = str(exc)
        raise
    finally:
        create_markdown_artifact(
            key="easel-run-summary",
            markdown=run_summary_markdown(project_dir, runs, failure),
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
