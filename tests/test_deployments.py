"""prefect.yaml against a real Prefect server on 127.0.0.1: deploy, inspect schedules through the
API, start a worker, trigger a deployment on the tiny models and see it complete."""

import asyncio
import os
import shutil
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture()
def prefect_server(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen(
        [str(REPO / ".venv/bin/prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise AssertionError("prefect server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield env
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()


def prefect(args, cwd, env, timeout=300):
    proc = subprocess.run(
        [str(REPO / ".venv/bin/prefect"), "--no-prompt", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"prefect {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


async def read_deployments(env):
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployments()


async def wait_for_run(flow_run_id, env, timeout=600):
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            await asyncio.sleep(2)
    raise AssertionError("the flow run did not finish")


def test_deploy_schedules_worker_and_a_triggered_run(prefect_server, project_factory, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = project_factory("deployed")
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    env = {
        **prefect_server,
        "EASEL_PROJECT_DIR": str(project),
        "EASEL_NO_PROGRESS": "1",
        "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}",
    }
    subprocess.run(["easel", "s3", "start"], cwd=project, env=env, check=True, capture_output=True)
    prefect(["work-pool", "create", "easel-process", "--type", "process"], project, env)
    prefect(["deploy", "--all"], project, env)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        deployments = {d.name: d for d in asyncio.run(read_deployments(env))}
        declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        assert set(deployments) == {d["name"] for d in declared}
        for spec in declared:
            deployed = deployments[spec["name"]]
            assert deployed.work_pool_name == "easel-process"
            assert deployed.parameters == spec["parameters"]
            crons = sorted(s.schedule.cron for s in deployed.schedules)
            assert crons == sorted(s["cron"] for s in spec.get("schedules", []))
            assert all(s.schedule.timezone == "UTC" for s in deployed.schedules)

        output = prefect(["deployment", "run", "easel-pipeline/nightly-data-refresh"], project, env)
        flow_run_id = output.split("UUID:")[1].split()[0]
        worker = subprocess.run(
            [str(REPO / ".venv/bin/prefect"), "worker", "start", "--pool", "easel-process", "--run-once"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        run = asyncio.run(wait_for_run(flow_run_id, env))
        assert run.state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
    assert (project / "data/caption/captions.parquet").is_file()  # download -> validate -> caption ran
    assert not (project / "data/train").exists()  # and nothing else
