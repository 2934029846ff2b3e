"""The `easel` command's surface, and prefect.yaml's deployments as Prefect reads them."""

import inspect
import subprocess
from pathlib import Path

import pytest
import yaml

from components.cli import build_parser
from components.config import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_is_a_command_with_help():
    parser = build_parser()
    for stage in STAGES:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([stage, "--help"])
        assert exit_info.value.code == 0
    out = subprocess.run(["easel", "--help"], capture_output=True, text=True, check=True).stdout
    for command in (*STAGES, "s3", "models", "registry", "demo"):
        assert command in out


def test_dvc_yaml_has_the_six_stages_in_order():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"easel {name}"


def test_prefect_yaml_deployments_are_valid_and_scheduled():
    from prefect.client.schemas.schedules import CronSchedule

    from flows.pipeline import easel_pipeline

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flow_params = set(inspect.signature(easel_pipeline.fn).parameters)
    assert config["deployments"]
    for deployment in config["deployments"]:
        module, _, func = deployment["entrypoint"].partition(":")
        assert (REPO / module).is_file() and func in ("easel_pipeline", "easel_pipeline_dask")  # the same flow
        assert set(deployment.get("parameters", {})) <= flow_params
        assert set(deployment.get("parameters", {}).get("stages", STAGES)) <= set(STAGES)
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises if invalid
    scheduled = {d["name"] for d in config["deployments"] if d.get("schedules")}
    assert {"nightly-data-refresh", "weekly-retrain-and-gate"} <= scheduled
