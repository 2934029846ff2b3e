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
