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
    assert "validate: accepted / rejected | 9 / 6" in markdown
    bucket = __import__("yaml").safe_load((project / "params.yaml").read_text())["storage"]["bucket"]
    listed = make_client(s3_server.settings()).list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert listed.get("KeyCount", 0) > 0  # dvc push put the data in the S3 remote

    again = easel_pipeline(stages=["download", "validate"], project_dir=str(project), push_to_remote=False)
    assert [r.ran for r in again] == [False, False]  # DVC: up to date


def test_a_failing_stage_fails_the_flow_and_the_artifact_says_so(harness, project_factory):
    project = project_factory("flowfail", {"validate.min_accepted": 100})
    with pytest.raises(Exception, match="only 9 of 15 images passed"):
        easel_pipeline(stages=["download", "validate"], project_dir=str(project), push_to_remote=False)
    assert "**Failed:** stage validate failed" in summary_artifact()
