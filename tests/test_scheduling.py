"""Schedules fire: prefect.yaml's scheduled deployment, deployed to a real Prefect server, gets its
runs created by the server's own scheduler (a lock that breaks the scheduler fails here), and the
server refuses a run whose stages name no stage."""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, prefect_cli

pytestmark = pytest.mark.slow


def project_copy(dest: Path) -> Path:
    """What `prefect deploy` reads: prefect.yaml, the flows and the code they import."""
    for name in ("prefect.yaml", "pyproject.toml", "params.yaml"):
        shutil.copy(REPO / name, dest / name)
    for folder in ("flows", "components"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


async def scheduled_runs(api_url: str, deployment_name: str, timeout_s: float) -> tuple[object, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(f"easel-pipeline/{deployment_name}")
            deadline = time.monotonic() + timeout_s
            runs: list = []
            while time.monotonic() < deadline:
                runs = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
                )
                if runs:
                    break
                await asyncio.sleep(2)
            return deployment, runs


async def create_run(api_url: str, deployment_id, parameters: dict):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)


@pytest.fixture()
def prefect_server(tmp_path, monkeypatch):
    """A real Prefect server whose scheduler looks for due schedules every 5 s (default 60 s): the
    test waits for the scheduler's loop, not for a minute to pass."""
    from tests.conftest import running_prefect_server

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")
    with running_prefect_server(tmp_path) as env:
        yield env


def test_a_deployed_schedule_creates_its_runs(prefect_server, tmp_path):
    from prefect.exceptions import PrefectHTTPStatusError

    project = project_copy(tmp_path)
    env = {**prefect_server, "PATH": f"{REPO / '.venv/bin'}:{prefect_server.get('PATH', '')}"}
    prefect_cli(["work-pool", "create", "easel-process", "--type", "process"], env, cwd=project)
    prefect_cli(["deploy", "--name", "nightly-data-refresh"], env, cwd=project)

    # The server's scheduler (not the deploy command) creates the upcoming runs of the cron schedule.
    deployment, runs = asyncio.run(scheduled_runs(env["PREFECT_API_URL"], "nightly-data-refresh", timeout_s=120))
    assert runs, "the scheduler created no run for a deployed schedule: is the lock's SQLAlchemy one Prefect supports?"
    nightly = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d.get("schedules"))
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"
    for run in runs:
        assert run.state.is_scheduled() and run.auto_scheduled, run
        start = run.expected_start_time.astimezone(UTC)
        assert (start.hour, start.minute) == (3, 0), start
        assert run.parameters == nightly["parameters"]

    # A misspelt stage is refused when the run is created, before anything runs.
    with pytest.raises(PrefectHTTPStatusError) as refused:
        asyncio.run(create_run(env["PREFECT_API_URL"], deployment.id, {"stages": ["evalute"]}))
    assert refused.value.response.status_code in (409, 422)
    assert "evalute" in refused.value.response.text
    accepted = asyncio.run(create_run(env["PREFECT_API_URL"], deployment.id, {"stages": ["evaluate"]}))
    assert accepted.parameters["stages"] == ["evaluate"]
