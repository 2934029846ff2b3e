"""prefect.yaml against a real Prefect server on 127.0.0.1: deploy, inspect schedules through the
API, start a worker, trigger a deployment on the tiny models and see it complete."""

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from components.config import STAGES
from tests.conftest import REPO, free_port, make_project, prefect_cli

pytestmark = pytest.mark.slow


def prefect(args, cwd, env, timeout=300):
    return prefect_cli(args, env, cwd=cwd, timeout=timeout).stdout


async def read_deployments(env):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployments()


async def wait_for_run(flow_run_id, env, timeout=600):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            await asyncio.sleep(2)
    raise AssertionError("the flow run did not finish")


def run_deployment(name: str, project: Path, env: dict, worker_dir: Path):
    """Trigger a run of the deployment and let a worker (in its own folder) run it; returns the run."""
    output = prefect(["deployment", "run", name], project, env)
    flow_run_id = output.split("UUID:")[1].split()[0]
    worker = subprocess.run(
        [str(REPO / ".venv/bin/prefect"), "worker", "start", "--pool", "easel-process", "--run-once"],
        cwd=worker_dir,  # the worker's own folder: the code comes from the remote
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    run = asyncio.run(wait_for_run(flow_run_id, env))
    print(worker.stdout[-6000:] + worker.stderr[-6000:])  # shown when the test fails
    return run


def git(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"git {args}: {proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture()
def origin(tmp_path, sample_site, s3_server, tiny_models):
    """The project as a repository on a (local, bare) remote: code, flows, prefect.yaml, infra."""
    project = make_project(
        tmp_path / "dev",
        sample_site.base_url,
        s3_server,
        tiny_models,
        {"sample_source.port": free_port(), "sample_source.dir": ".easel/sample-source"},
    )
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "infra", project / "infra", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prefect.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, project / name)
    git(["add", "-A"], project)
    git(["commit", "-qm", "flows and deployments"], project)
    bare = tmp_path / "origin.git"
    git(["clone", "-q", "--bare", str(project), str(bare)], tmp_path)
    return project, bare, git(["rev-parse", "--abbrev-ref", "HEAD"], project)


def test_a_scheduled_run_fetches_the_code_and_records_results_anyone_can_pull(
    prefect_server, origin, tmp_path, s3_server
):
    """Deploy; the weekly deployment's run on a worker clones the remote, runs the six stages,
    pushes its outputs and records them as a branch; a fresh clone fetches that branch, pulls every
    output and runs the PR eval gate's steps on it."""
    from prefect.artifacts import Artifact
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.release.registry import Registry
    from components.storage import make_client
    from tests.test_eval_gate_workflow import run_workflow, workflow_env

    project, bare, branch = origin
    env = {
        **prefect_server,
        "EASEL_GIT_REPOSITORY": str(bare),
        "EASEL_GIT_BRANCH": branch,
        "EASEL_WORK_DIR": str(tmp_path / "work"),
        "EASEL_NO_PROGRESS": "1",
        "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}",
    }
    env.pop("EASEL_S3_ENDPOINT", None)
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
            assert deployed.global_concurrency_limit.limit == 1  # runs queue instead of overlapping
            assert deployed.concurrency_options.collision_strategy.value == "ENQUEUE"
            assert "flows.workspace.checkout" in deployed.pull_steps[0]

        run = run_deployment("easel-pipeline/weekly-retrain-and-gate", project, env, tmp_path)
        assert run.state.is_completed() and run.state.name == "Completed", run.state
        summary = Artifact.get("easel-run-summary").data

    # The run happened in a fresh clone of the remote, not in the developer's folder.
    work = tmp_path / "work"
    assert (work / "data/train/model/model_index.json").is_file() and not (project / "data/train").exists()
    runs = git(["ls-remote", "--heads", str(bare), "easel/runs/weekly-retrain-and-gate/*"], tmp_path).splitlines()
    assert len(runs) == 1, runs
    result_branch = runs[0].split("refs/heads/")[1]
    assert f"git fetch origin {result_branch}" in summary and "| promote | ran |" in summary
    bucket = yaml.safe_load((project / "params.yaml").read_text())["storage"]["bucket"]
    registry = Registry(make_client(s3_server.settings()), s3_server.settings(), bucket, "registry")
    production = registry.alias("sdxl-posters", "production")["version"]

    # Another machine: a fresh clone fetches the run's branch and pulls every output it names.
    fresh = tmp_path / "fresh"
    git(["clone", "-q", str(bare), str(fresh)], tmp_path)
    git(["fetch", "-q", "origin", result_branch], fresh)
    git(["checkout", "-q", "FETCH_HEAD"], fresh)
    assert (fresh / "data/promote/decision.json").is_file()  # the decision travels with the branch
    try:
        results = run_workflow(fresh, workflow_env(fresh, s3_server))
    finally:  # the workflow's sample step leaves the sample site serving, as a runner's job would
        subprocess.run([str(REPO / ".venv/bin/easel"), "sample-source", "stop"], cwd=fresh, capture_output=True)
    failed = {k: v.stdout[-800:] + v.stderr[-1500:] for k, v in results.items() if v.returncode}
    # The pull request's model is production itself, from the remote: no training, no evaluation,
    # nothing to decide on, and it passes.
    assert list(results) == ["setup", "storage", "pull", "sample", "models", "evaluate", "gate"], failed
    assert "Running stage" not in results["evaluate"].stdout
    comment = (fresh / "gate-comment.md").read_text()
    assert "is **unchanged**" in comment and f"production ({production}) has this fingerprint" in comment

    # The next scheduled run starts where this one ended: nothing new, so nothing reruns, nothing is
    # pushed, no branch is recorded.
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        second = run_deployment("easel-pipeline/weekly-retrain-and-gate", project, env, tmp_path)
        assert second.state.name == "Completed", second.state
        summary = Artifact.get("easel-run-summary").data
    assert all(f"| {stage} | up to date |" in summary for stage in STAGES), summary
    assert "Results: `git fetch" not in summary
    assert git(["ls-remote", "--heads", str(bare), "easel/runs/*"], tmp_path).splitlines() == runs

    # A cold work folder (a new pod): the clone gets the last run's dvc.lock from its results branch
    # and pulls the outputs the stage needs from the DVC remote, so evaluation is up to date at once.
    env["EASEL_WORK_DIR"] = str(tmp_path / "cold")
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        cold = run_deployment("easel-pipeline/on-demand-evaluation", project, env, tmp_path)
        assert cold.state.name == "Completed", cold.state
        summary = Artifact.get("easel-run-summary").data
    assert "| evaluate | up to date |" in summary, summary
    assert (tmp_path / "cold/data/train/model/model_index.json").is_file()


def test_easel_demo_from_a_clean_folder(prefect_server, tmp_path):
    """The README's first command in a folder with only the repository's files: the six stages run,
    the model reaches the registry, and the run summary is on the Prefect server."""
    from prefect.artifacts import Artifact
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.release.registry import Registry
    from components.storage import EmbeddedS3, make_client
    from tests.conftest import free_port_block

    clean = tmp_path / "clean"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (clean / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clean / name)
    # Outside a clone the demo stops in one line, before it starts anything: DVC needs a git repository.
    outside = subprocess.run([str(REPO / ".venv/bin/easel"), "demo"], cwd=clean, capture_output=True, text=True)
    assert outside.returncode == 2 and "not a DVC project in a git repository" in outside.stderr, outside.stderr
    assert not (clean / ".easel").exists()
    git(["init", "-q"], clean)  # what `git clone` gives: the files, committed
    git(["add", "-A"], clean)
    git(["commit", "-qm", "clone"], clean)
    (clean / ".venv").symlink_to(REPO / ".venv")
    # The embedded defaults, on ports of their own (a developer's own demo may hold 8333 and 8765).
    s3_port, site_port = free_port_block(), free_port()
    params = (clean / "params.yaml").read_text().replace("port: 8333", f"port: {s3_port}")
    params = params.replace("port: 8765", f"port: {site_port}").replace("127.0.0.1:8765", f"127.0.0.1:{site_port}")
    (clean / "params.yaml").write_text(params)
    for source in (clean / "data/sources").glob("*.csv"):
        source.write_text(source.read_text().replace("127.0.0.1:8765", f"127.0.0.1:{site_port}"))
    env = {k: v for k, v in prefect_server.items() if not k.startswith(("EASEL_S3_", "AWS_"))}
    env |= {"EASEL_NO_PROGRESS": "1", "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    try:
        demo = subprocess.run(
            [str(clean / ".venv/bin/easel"), "demo"], cwd=clean, env=env, capture_output=True, text=True, timeout=1500
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        lines = {
            line.split()[0] + " " + line.split()[1]: line for line in demo.stdout.splitlines() if len(line.split()) > 2
        }
        assert "promote" in lines["gate verdict"]
        # The run's page in the UI of the server it ran on (PREFECT_API_URL here; the local one otherwise).
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        assert lines["Prefect run"].split()[2].startswith(f"{ui}/runs/flow-run/"), lines["Prefect run"]
        version = lines["registry entry"].rsplit("-> ", 1)[1].rstrip(")")
        server = EmbeddedS3(data_dir=clean / ".easel/s3", port=s3_port)
        registry = Registry(make_client(server.settings()), server.settings(), "easel", "registry")
        assert registry.alias("sdxl-posters", "production")["version"] == version
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            summary = Artifact.get("easel-run-summary").data
        assert "| promote | ran |" in summary and f"`{version}`" in summary
    finally:
        subprocess.run([str(clean / ".venv/bin/easel"), "s3", "stop"], cwd=clean, env=env, capture_output=True)
        subprocess.run(
            [str(clean / ".venv/bin/easel"), "sample-source", "stop"], cwd=clean, env=env, capture_output=True
        )
