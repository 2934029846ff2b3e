"""The Prefect flow under prefect_test_harness: a task per stage, a summary artifact, dvc push."""

import pytest
from prefect.testing.utilities import prefect_test_harness

from components.storage import make_client
from flows.pipeline import easel_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def summary_artifact() -> str:
    from prefect.artifacts import Artifact

    artifact = Artifact.get("easel-run-summary")  # the latest one with this key
    return artifact.data if artifact else ""


def test_flow_runs_stages_as_tasks_and_pushes(harness, project_factory, s3_server):
    project = project_factory("flow")
    runs = easel_pipeline(stages=["download", "validate"], project_dir=str(project))
    assert [(r.stage, r.ran) for r in runs] == [("download", True), ("validate", True)]
    markdown = summary_artifact()
    assert "validate: accepted / rejected | 9 / 8" in markdown
    bucket = __import__("yaml").safe_load((project / "params.yaml").read_text())["storage"]["bucket"]
    listed = make_client(s3_server.settings()).list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert listed.get("KeyCount", 0) > 0  # dvc push put the data in the S3 remote

    from prefect.artifacts import Artifact

    reports = Artifact.get("easel-reports").data  # the run links the reports it made
    assert "validation" in reports and (project / "data/validate/report.html").as_uri() in reports

    again = easel_pipeline(stages=["download", "validate"], project_dir=str(project), push_to_remote=False)
    assert [r.ran for r in again] == [False, False]  # DVC: up to date


def test_a_failing_stage_fails_the_flow_and_the_artifact_says_so(harness, project_factory):
    project = project_factory("flowfail", {"validate.min_accepted": 100})
    with pytest.raises(Exception, match="only 9 of 17 images passed"):
        easel_pipeline(stages=["download", "validate"], project_dir=str(project), push_to_remote=False)
    assert "**Failed:** stage validate failed" in summary_artifact()


def test_sharded_download_then_the_dvc_stage_fetches_nothing(harness, project_factory, sample_site):
    import pandas as pd

    project = project_factory("sharded")
    (run,) = easel_pipeline(stages=["download"], shards=3, project_dir=str(project), push_to_remote=False)
    lines = [shard.summary for shard in run.shards]
    assert len(lines) == 3
    fetched = sum(int(line.split("fetched ")[1].split()[0]) for line in lines)
    assert fetched == 18, (
        lines,
        pd.read_parquet(project / "data/download/manifest.parquet")[["url", "status", "error"]].to_string(),
    )  # every distinct URL of the sample sources, each by exactly one shard
    manifest = pd.read_parquet(project / "data/download/manifest.parquet")
    assert len(manifest) == 20 and "not_fetched" not in set(manifest["status"])
    assert run.ran and "download" in (project / "dvc.lock").read_text()  # the DVC stage ran and recorded it

    (again,) = easel_pipeline(stages=["download"], shards=3, project_dir=str(project), push_to_remote=False)
    assert not again.ran and again.shards == []  # DVC: up to date, so no shard was started


def flow_run_of(state) -> tuple[object, list]:
    """The flow run a returned state belongs to, and its task runs (from the server)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            run_id = state.state_details.flow_run_id
            run = await client.read_flow_run(run_id)
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            return run, tasks

    return asyncio.run(read())


def test_a_misspelt_stage_is_refused_before_anything_runs(harness, project_factory):
    project = project_factory("misspelt")
    with pytest.raises(Exception, match=r"stages\.0: Input should be 'download', 'validate'"):
        easel_pipeline(stages=["evalute"], project_dir=str(project))
    assert not (project / ".dvc" / "config.local").exists()  # nothing prepared, nothing run
    assert not (project / "data" / "download").exists()


def test_a_deterministic_failure_is_not_retried_and_the_summary_is_written(harness, project_factory):
    """A source that is not there fails the same way every time: the download stage (retried only
    after temporary failures) runs once, and the run's summary says why."""
    import yaml

    project = project_factory("notretried")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"]["sources"][0]["path"] = "data/sources/absent.csv"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = easel_pipeline(stages=["download"], project_dir=str(project), push_to_remote=False, return_state=True)
    assert state.is_failed()
    _, tasks = flow_run_of(state)
    download = [t for t in tasks if t.name.startswith("stage-download")]
    assert len(download) == 1 and download[0].run_count == 1, [(t.name, t.run_count) for t in tasks]
    assert "**Failed:** stage download failed" in summary_artifact() and "absent.csv" in summary_artifact()


def test_a_run_that_fails_before_its_stages_still_writes_its_summary(harness, project_factory):
    """Bad params stop the run in its first step: it fails at once (no retry) and its summary says why."""
    project = project_factory("badparams")
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("min_dpi: 96", "min_dpi: lots", 1))
    state = easel_pipeline(stages=["download"], project_dir=str(project), push_to_remote=False, return_state=True)
    assert state.is_failed()
    summary = summary_artifact()
    assert "**Failed:** " in summary and "params.yaml: validate.min_dpi" in summary and "'lots'" in summary
    assert not (project / "data" / "download").exists()


def test_a_stage_past_its_time_limit_is_stopped_and_the_run_times_out(harness, project_factory):
    """orchestration.stage_timeout_s: the stage and every process it started are stopped, and the run
    ends TimedOut (which the automation reports) instead of hanging."""
    import os

    project = project_factory("timeout", {"orchestration.stage_timeout_s": {"download": 1}})
    state = easel_pipeline(stages=["download"], project_dir=str(project), push_to_remote=False, return_state=True)
    run, _ = flow_run_of(state)
    assert run.state.name == "TimedOut", run.state
    assert "stage_timeout_s" in summary_artifact()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(project)):
                left.append(pid)
        except OSError:
            continue
    assert left == [], "processes of the stopped stage are still running"


def test_transient_and_deterministic_failures_are_told_apart():
    from prefect.states import Failed

    from components.pipeline import StageFailed, is_transient
    from components.plumbing.errors import TEMPORARY, ConfigError
    from components.storage import StorageUnavailable
    from flows.pipeline import transient_only

    assert transient_only(None, None, Failed(data=StageFailed("stage download failed: ...", transient=True)))
    assert not transient_only(None, None, Failed(data=StageFailed("stage download failed: ...")))
    assert not transient_only(None, None, Failed(data=ConfigError("params.yaml: bad")))
    assert not transient_only(None, None, Failed(data=ValueError("a bug")))
    unreachable = StorageUnavailable("the S3 endpoint is unreachable", transient=True)
    assert is_transient(unreachable) and unreachable.line().endswith(TEMPORARY)
