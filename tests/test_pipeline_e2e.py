"""The whole pipeline as users run it: `dvc repro` in a project on the tiny models, real S3."""

import itertools
import json
import os
import subprocess

import pandas as pd
import pytest
import yaml

from components.release.registry import Registry
from components.storage import make_client
from tests.conftest import copy_project

pytestmark = pytest.mark.slow


def sh(args, cwd, check=True):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_dvc_repro_runs_all_six_stages_then_nothing(finished_pipeline, s3_server, tmp_path):
    # The session's finished project: `easel s3 start` (the running server, DVC pointed at it), then
    # `dvc repro` in a fresh project. What that first run printed and wrote is checked here.
    first = finished_pipeline.first_repro
    for stage in ("download", "validate", "caption", "train", "evaluate", "promote"):
        assert f"Running stage '{stage}'" in first
    project = copy_project(finished_pipeline.project, tmp_path / "project")  # the rest changes things

    manifest = pd.read_parquet(project / "data/download/manifest.parquet")
    assert len(manifest) == 20  # every input row of both sources, whatever happened to it
    assert manifest["status"].value_counts().to_dict() == {"ok": 17, "not_image": 1, "http_404": 1, "missing_url": 1}
    validate = json.loads((project / "data/metrics/validate.json").read_text())
    # 17 downloaded rows: astronaut.png is listed three times (twice at one URL, once at a mirror).
    assert (validate["images"], validate["accepted"], validate["rejected"]) == (17, 9, 8)
    failing = {rule: n for rule, n in validate["rejected_by_rule"].items() if n}
    assert failing == {
        "decodable": 1,
        "short_side": 2,
        "long_side": 2,
        "dpi": 1,
        "dpi_missing": 1,
        "kb_per_pixel": 1,
        "exact_duplicate": 2,
    }
    assert len(pd.read_parquet(project / "data/caption/captions.parquet")) == 9
    assert (project / "data/train/model/unet/diffusion_pytorch_model.safetensors").is_file()
    evaluate = json.loads((project / "data/metrics/evaluate.json").read_text())
    assert evaluate["aesthetic"]["count"] == 48  # the tiny profile's 24 prompts x 2 seeds
    decision = json.loads((project / "data/promote/decision.json").read_text())
    assert decision["promote"] is True

    params = yaml.safe_load((project / "params.yaml").read_text())
    registry = Registry(
        make_client(s3_server.settings()), s3_server.settings(), params["storage"]["bucket"], "registry"
    )
    production = registry.alias("sdxl-posters", "production")
    assert production["version"] == decision["registry"]["version"]

    second = sh(["dvc", "repro"], project)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout

    # Editing a shared module makes exactly the stages that import it out of date.
    from tests.test_dvc_deps import stages_importing

    shared = project / "components/prompts.py"
    original = shared.read_text()
    shared.write_text(original + "\n# an edit\n")
    status = json.loads(sh(["dvc", "status", "--json"], project).stdout)
    assert set(status) == stages_importing("components/prompts.py") == {"train", "evaluate", "promote"}
    shared.write_text(original)

    dag = sh(["dvc", "dag", "--dot"], project).stdout
    chain = ["download", "validate", "caption", "train", "evaluate", "promote"]
    for upstream, downstream in itertools.pairwise(chain):
        assert f'"{upstream}" -> "{downstream}"' in dag
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], project).stdout)
    assert metrics[""]["data"]["data/metrics/validate.json"]["data"]["accepted"] == 9
    pushed = sh(["dvc", "push"], project)
    assert "pushed" in pushed.stdout or "up to date" in pushed.stdout

    # A pull request that raises the bar: the flow ends Rejected (not Failed), production stays.
    from prefect.artifacts import Artifact
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import easel_pipeline

    # (Against a registry as it was when this model was evaluated, with nothing in production: a new
    # bucket. A model that is production's own is "unchanged", whatever the bar.)
    bucket = "raised-" + os.urandom(3).hex()
    project = copy_project(project, tmp_path / "raised", bucket=bucket)
    sh(["easel", "s3", "start"], project)
    registry = Registry(make_client(s3_server.settings()), s3_server.settings(), bucket, "registry")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profiles"]["tiny"]["gate"]["min_aesthetic_mean"] = 100.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with prefect_test_harness(server_startup_timeout=120):
        state = easel_pipeline(stages=["promote"], project_dir=str(project), push_to_remote=False, return_state=True)
        summary = Artifact.get("easel-run-summary").data
    assert state.is_completed() and state.name == "Rejected", state
    assert "| promote | gate verdict: reject |" in summary and "| aesthetic_mean |" in summary and "FAIL" in summary
    assert registry.alias("sdxl-posters", "production") is None  # nothing promoted
    rejected = sh(["easel", "promote"], project, check=False)
    assert rejected.returncode == 3 and rejected.stderr.count("\n") == 1 and "aesthetic_mean" in rejected.stderr


def test_a_stage_that_fails_says_why_through_dvc(project_factory):
    project = project_factory("strict", {"validate.min_accepted": 100})
    proc = sh(["dvc", "repro", "validate"], project, check=False)
    assert proc.returncode != 0
    assert "only 9 of 17 images passed (53%; validate.min_accepted is 100" in proc.stderr + proc.stdout
    assert (project / "data/validate/report.html").is_file()  # the report is there to read why


def test_cli_bad_params_exit_with_one_clear_line(project_factory):
    project = project_factory("badparams")
    text = (project / "params.yaml").read_text().replace("min_dpi: 96", "min_dpi: lots")
    (project / "params.yaml").write_text(text)
    proc = sh(["easel", "validate"], project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("easel validate: error: params.yaml: validate.min_dpi:")
    assert "Traceback" not in proc.stderr
