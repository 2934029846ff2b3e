"""The PR eval gate workflow: it lints clean, and its steps, run here in the same order, gate a
passing and a failing candidate on the tiny models against the (embedded) S3."""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_project, free_port

pytestmark = pytest.mark.slow

WORKFLOW = REPO / ".github" / "workflows" / "eval-gate.yml"


def test_workflow_passes_actionlint():
    proc = subprocess.run(["bash", "infra/ci/lint-workflows.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def workflow_steps() -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["gate"]["steps"]


def expand(text: str, context: dict) -> str:
    """The ${{ }} expressions the workflow's run steps use, filled from `context`."""
    return re.sub(r"\$\{\{\s*([^}]+?)\s*\}\}", lambda m: context[m.group(1)], text)


def should_run(step: dict, outcomes: dict[str, str], runner_set: bool) -> bool:
    condition = step.get("if", "").strip()
    if not condition:
        return True
    if condition == "${{ !vars.EASEL_GATE_RUNNER }}":
        return not runner_set
    if condition == "steps.gate.outcome != 'success'":
        return outcomes.get("gate") != "success"
    raise AssertionError(f"the test does not know how to evaluate `if: {condition}`; teach it")


def runner_path() -> str:
    """PATH as a runner has it: the system's tools and setup-python's interpreter, no project venv."""
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and "/.venv/" not in p + "/")


def run_workflow(project: Path, env: dict) -> dict[str, subprocess.CompletedProcess]:
    """Every `run:` step, in order, as the runner would (bash -e, the runner's PATH, $GITHUB_PATH
    entries put in front of PATH for the later steps); `uses:` steps are GitHub's own."""
    context = {"github.server_url": "https://github.example", "github.repository": "easel/easel", "github.run_id": "42"}
    outcomes: dict[str, str] = {}
    results = {}
    env = {**env, "PATH": runner_path()}
    github_path = project.parent / f"{project.name}-github-path"
    for step in workflow_steps():
        if "run" not in step or not should_run(step, outcomes, runner_set=False):
            continue
        command = expand(step["run"], context)
        github_path.write_text("")
        proc = subprocess.run(
            ["bash", "-e", "-c", command],
            cwd=project,
            env={**env, "GITHUB_PATH": str(github_path)},
            capture_output=True,
            text=True,
        )
        added = [line for line in github_path.read_text().splitlines() if line]
        env["PATH"] = os.pathsep.join([*reversed(added), env["PATH"]])
        results[step["id"]] = proc
        outcomes[step["id"]] = "success" if proc.returncode == 0 else "failure"
        if proc.returncode != 0 and not step.get("continue-on-error"):
            break
    return results


def workflow_env(project: Path, s3_server) -> dict[str, str]:
    """The suite's venv linked into `project` (as the setup step finds it) and the secrets' S3 settings."""
    # A venv set up from another lock would be reinstalled by the setup step, with this throwaway
    # project as its editable source: refuse instead of breaking the venv the suite runs in.
    want = hashlib.sha256((REPO / "infra/requirements.lock").read_bytes() + (REPO / "pyproject.toml").read_bytes())
    stamp = REPO / ".venv" / ".easel-install-stamp"
    if not stamp.is_file() or stamp.read_text().strip() != want.hexdigest():
        pytest.fail("the venv is not set up from the current lock: run `bash infra/easel.sh setup` first")
    (project / ".venv").symlink_to(REPO / ".venv")
    settings = s3_server.settings()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "EASEL_S3_ENDPOINT": settings.endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.access_key,
        "AWS_SECRET_ACCESS_KEY": settings.secret_key,
        "EASEL_NO_PROGRESS": "1",
    }


@pytest.fixture()
def gate_project(tmp_path, s3_server, finished_pipeline):
    """The session's finished project (main, as it stands), in a registry and DVC remote of its own with
    nothing in production, on a pull request that changes training (fewer steps)."""
    project = copy_project(finished_pipeline.project, tmp_path / "repo", bucket="gate-" + os.urandom(3).hex())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample_source"] = {"port": free_port(), "dir": ".easel/sample-source", "host": "127.0.0.1"}
    params["profiles"]["tiny"]["train"]["max_train_steps"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # What the workflow's setup step needs: the lock, pyproject and the bootstrap script. The venv
    # is the one these tests run in (setup finds it up to date and installs nothing).
    shutil.copytree(REPO / "infra", project / "infra")
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    env = workflow_env(project, s3_server)
    yield project, env
    subprocess.run([str(REPO / ".venv/bin/easel"), "sample-source", "stop"], cwd=project, capture_output=True)


def test_passing_then_failing_candidate(gate_project):
    project, env = gate_project

    # 1. A pull request whose model passes: every step succeeds, the verdict step does not run.
    results = run_workflow(project, env)
    assert list(results) == ["setup", "storage", "pull", "sample", "models", "evaluate", "gate"], {
        k: v.stdout[-500:] + v.stderr[-1500:] for k, v in results.items() if v.returncode
    }
    assert "EASEL_S3_ENDPOINT is set" in results["storage"].stdout  # the repository secrets' S3
    # The pull request changed training: it trains, on data the earlier stages already made.
    assert "Running stage 'train'" in results["evaluate"].stdout
    assert "Running stage 'download'" not in results["evaluate"].stdout
    comment = (project / "gate-comment.md").read_text()
    assert comment.startswith("<!-- easel-eval-gate -->")
    assert "the candidate passes the gate" in comment and "Promotion gate: **PROMOTE**" in comment
    assert "| Path | Metric | base | candidate | Change |" in comment  # dvc metrics diff style
    assert "https://github.example/easel/easel/actions/runs/42" in comment

    # What main's pipeline does after a run: push data and models to the DVC remote.
    subprocess.run([str(project / ".venv/bin/dvc"), "push"], cwd=project, env=env, check=True, capture_output=True)
    for stage_output in ("data/download", "data/validate", "data/caption", "data/train", "data/evaluate"):
        shutil.rmtree(project / stage_output)

    # 2. A pull request that raises the bar above what the model reaches: the gate rejects.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profiles"]["tiny"]["gate"]["min_aesthetic_mean"] = 100.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    results = run_workflow(project, env)
    assert "Running stage 'train'" not in results["evaluate"].stdout  # models came from the DVC remote
    assert results["gate"].returncode == 3
    assert results["verdict"].returncode == 1  # the job fails
    comment = (project / "gate-comment.md").read_text()
    assert "**fails the gate**" in comment and "Promotion gate: **REJECT**" in comment
    assert "| aesthetic_mean |" in comment and "FAIL" in comment

    # 3. The model is then promoted. A pull request that does not change it (one touching only flows/,
    #    say) has nothing to measure: no training, no evaluation, and it passes as "unchanged" (the
    #    raised bar is for candidates; production's own model is not judged again).
    from components.storage import S3Settings
    from tests.helpers import put_in_production

    settings = S3Settings(env["EASEL_S3_ENDPOINT"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    _, version = put_in_production(
        settings, params["storage"]["bucket"], project / "data/train/model", params["promote"]["model_name"]
    )
    results = run_workflow(project, env)
    assert list(results) == ["setup", "storage", "pull", "sample", "models", "evaluate", "gate"], {
        k: v.stdout[-500:] + v.stderr[-1500:] for k, v in results.items() if v.returncode
    }
    assert "Running stage" not in results["evaluate"].stdout  # neither trained nor evaluated
    assert "The model is the one in production: nothing to evaluate." in results["evaluate"].stdout
    assert results["gate"].returncode == 0 and "gate: unchanged" in results["gate"].stdout
    comment = (project / "gate-comment.md").read_text()
    assert "is **unchanged**" in comment and f"production ({version}) has this fingerprint" in comment
