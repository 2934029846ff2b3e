"""Fault injection, by class, for every `easel` command a user runs.

The classes: bad params; unreadable or empty input; and an S3 endpoint that is down, hangs
(accepts connections, never answers), answers HTTP but is not S3, refuses the credentials, or
is not a URL at all. Every case runs the real command line in a copy of a project whose whole
pipeline has run, and asserts the exit code (2: unusable input; 3: the gate rejects), a single
`easel <command>:` line on stderr with no traceback (and not the safety net's "unexpected error",
which would mean the case is not handled), and that every file under data/ is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, free_port
from tests.fault_servers import HangingServer, NotS3Server

pytestmark = pytest.mark.slow

# Short waits, so that the hanging endpoint costs seconds, not the default 20.
FAST_S3 = {"storage.read_timeout_s": 1, "storage.connect_timeout_s": 1, "storage.retries": 0}


@pytest.fixture()
def project(finished_pipeline, tmp_path):
    """A copy of the session's finished project (six stages run, one model in production), with short S3 waits."""
    project = copy_project(finished_pipeline.project, tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in FAST_S3.items():
        section, name = key.split(".")
        params[section][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_S3_", "AWS_"))}
    return env | {"EASEL_NO_PROGRESS": "1"} | extra


def data_files(project: Path) -> dict[str, str]:
    return {
        str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((project / "data").rglob("*"))
        if p.is_file()
    }


def easel(project: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["easel", *args], cwd=project, capture_output=True, text=True, env=env, timeout=300)


def assert_fails_cleanly(
    project: Path, args: list[str], env: dict[str, str], code: int = 2, may_write: tuple[str, ...] = ()
) -> str:
    """Run; check the exit code, the one line, and that data/ is as it was. Returns the line."""
    before = data_files(project)
    proc = easel(project, args, env)
    command = args[2] if args[0] == "--params" else args[0]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert proc.returncode == code, (args, proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"easel {command}: "), proc.stderr[-3000:]
    assert "unexpected error" not in errors[0], errors[0]  # the safety net caught it: not handled
    after = data_files(project)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {k for k in changed if not k.startswith(may_write)} == set(), changed
    return errors[0]


# -- bad params: every command reads params.yaml first --------------------------------------------

COMMANDS = [
    ["download"],
    ["validate"],
    ["caption"],
    ["train"],
    ["evaluate"],
    ["promote"],
    ["gate"],
    ["export"],
    ["s3", "start"],
    ["s3", "status"],
    ["registry", "list"],
    ["config", "show"],
    ["sample-source", "build"],
    ["demo"],
]


def fail_each(project: Path, commands: list[list[str]], env: dict[str, str]) -> list[str]:
    """assert_fails_cleanly for each command, several at a time: each is a process that mostly waits
    (on imports, on an endpoint), and none may write anything, so they cannot disturb one another."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: assert_fails_cleanly(project, args, env), commands))


def test_bad_params_stop_every_command_in_one_line(project):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("min_dpi: 96", "min_dpi: lots", 1))
    for line in fail_each(project, COMMANDS, clean_env()):
        assert "params.yaml: validate.min_dpi:" in line and "'lots'" in line, line
    params.write_text("profile: tiny\nprofiles: [")
    for args in (["download"], ["gate"], ["registry", "list"]):
        assert "is not valid YAML" in assert_fails_cleanly(project, args, clean_env())


# -- unreadable or empty input, stage by stage -------------------------------------------------------


def garble(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what it should be\x00" * 10)


def test_unreadable_or_empty_inputs_are_named(project):
    env = clean_env()
    sources = project / "data/sources/sample_posters.csv"
    original = sources.read_text()
    sources.write_text(original.splitlines()[0] + "\n")  # a header and no rows
    assert "source 'sample_posters'" in assert_fails_cleanly(project, ["download"], env)
    sources.write_text(original)

    checks = [
        ("data/download/manifest.parquet", ["validate"], "manifest.parquet: cannot be read"),
        ("data/validate/accepted.parquet", ["caption"], "accepted.parquet: cannot be read"),
        ("data/caption/captions.parquet", ["train"], "captions.parquet: cannot be read"),
        ("data/prompts/eval_prompts.csv", ["evaluate"], "eval_prompts.csv"),
        ("data/train/model/unet/config.json", ["export"], "config.json"),
    ]
    for rel, args, expected in checks:
        target = project / rel
        saved = target.read_bytes()
        garble(target)
        assert expected in assert_fails_cleanly(project, args, env), rel
        target.write_bytes(saved)

    # The gate reads the evaluation: a broken one is a verdict (reject, exit 3), recorded only in its own folder.
    # (Of a model other than production's: production's own is "unchanged", with nothing to evaluate.)
    (project / "data/train/model/notes.txt").write_text("not the model in production")
    summary = project / "data/evaluate/summary.json"
    saved = summary.read_bytes()
    garble(summary)
    line = assert_fails_cleanly(project, ["gate", "--out", "data/gate"], env, code=3, may_write=("data/gate/",))
    assert "evaluation_summary" in line
    assert "evaluation_summary" in assert_fails_cleanly(project, ["promote"], env, 3, may_write=("data/promote/",))
    summary.write_bytes(saved)

    assert "no version or alias 'v-nope'" in assert_fails_cleanly(
        project, ["registry", "download", "v-nope", "--dest", "elsewhere"], env
    )
    assert "not found" in assert_fails_cleanly(project, ["--params", "nope.yaml", "config", "show"], env)


# -- S3 that is down, hangs, is not S3, refuses us, or is not a URL ---------------------------------------

S3_COMMANDS = [
    ["s3", "start"],
    ["registry", "list"],
    ["registry", "show"],
    ["registry", "download", "--dest", "downloaded"],
    ["registry", "promote", "v-0000000000000000"],
    ["registry", "rollback"],
    ["registry", "gc"],
    ["gate"],
    ["promote"],
    ["evaluate"],
]


def with_s3_source(project: Path) -> None:
    """The download stage reads an s3:// prefix: the case where download talks to S3."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"]["sources"] = [{"name": "bucket_images", "path": "s3://images/posters/"}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def check_every_s3_command(project: Path, env: dict[str, str], expected: str) -> None:
    for args, line in zip(S3_COMMANDS, fail_each(project, S3_COMMANDS, env), strict=True):
        assert expected in line, (args, line)
    with_s3_source(project)
    assert expected in assert_fails_cleanly(project, ["download"], env)


def s3_env(url: str, secret: str = "not-the-secret") -> dict[str, str]:
    return clean_env(EASEL_S3_ENDPOINT=url, AWS_ACCESS_KEY_ID="easel-test", AWS_SECRET_ACCESS_KEY=secret)


def test_s3_down(project):
    check_every_s3_command(project, s3_env(f"http://127.0.0.1:{free_port()}"), "is unreachable")


def test_embedded_s3_not_running(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["storage"]["embedded"]["port"] = free_port()  # nothing there; `easel s3 start` would start it
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args, line in zip(S3_COMMANDS[1:], fail_each(project, S3_COMMANDS[1:], clean_env()), strict=True):
        assert "start it with `easel s3 start`" in line, args


def test_s3_hanging(project):
    with HangingServer() as server:
        check_every_s3_command(project, s3_env(server.url), "did not answer within 1 s")


@pytest.mark.parametrize("status", [200, 404])
def test_s3_that_is_not_s3(project, status):
    with NotS3Server(status) as server:
        check_every_s3_command(project, s3_env(server.url), "is it an S3 server?")


def test_s3_refusing_the_credentials(project, s3_server):
    check_every_s3_command(project, s3_env(s3_server.endpoint_url), "refused the credentials")


def test_s3_endpoint_that_is_not_a_url(project):
    check_every_s3_command(project, s3_env("not-a-url"), "EASEL_S3_ENDPOINT='not-a-url' is not an http(s) URL")


# -- the safety net ------------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_a_log_file(project, monkeypatch, capsys):
    """The net for bugs: here a bug is simulated (a mock, since no input is known to cause one)."""
    import components.cli as cli

    monkeypatch.chdir(project)
    monkeypatch.setattr(cli, "cmd_config", lambda args: {}["no such key"])
    assert cli.main(["config", "show"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("easel config: unexpected error: KeyError: 'no such key' (traceback in ")
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert "Traceback (most recent call last)" in log.read_text() and log.parent == Path(".easel/logs")
    monkeypatch.setenv("EASEL_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli.main(["config", "show"])


# -- what a file says never runs, and a failed command writes nothing ------------------------------------


def with_params(project: Path, name: str, change) -> str:
    """A second params file in the project, changed by `change`; returns its name for --params."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def test_a_pickle_checkpoint_named_in_params_is_refused_when_params_load(project):
    """A .ckpt runs code when it is loaded: refused by name before any model code is imported."""

    def base_ckpt(params):
        params["profiles"]["tiny"]["models"]["sdxl"] = "/models/merged-sdxl.ckpt"

    def vae_pt(params):
        params["models"]["vae"] = "/models/sdxl_vae.pt"

    commands = [
        ["--params", with_params(project, "ckpt.yaml", base_ckpt), "train"],
        ["--params", with_params(project, "pt.yaml", vae_pt), "evaluate"],
    ]
    first, second = fail_each(project, commands, clean_env())
    assert "profiles.tiny.models.sdxl: a pickle checkpoint, which can run code" in first, first
    assert "models.vae: a pickle checkpoint" in second, second


def test_a_broken_safetensors_file_is_named_in_one_line(project):
    """Pickle bytes under a .safetensors name: exit 2 with the file named, not "unexpected error" (every
    kind of broken file: tests/test_single_file.py)."""
    import pickle

    (project / "pickled.safetensors").write_bytes(pickle.dumps({"model.diffusion_model.x": [0.0] * 8}))

    def point_at(params):
        params["profiles"]["tiny"]["models"]["sdxl"] = str(project / "pickled.safetensors")
        params["profiles"]["tiny"]["models"]["sdxl_config"] = str(project / ".easel/models/tiny/sdxl")

    name = with_params(project, "pickled.yaml", point_at)
    line = assert_fails_cleanly(project, ["--params", name, "train"], clean_env())
    assert "pickled.safetensors: not a safetensors file" in line, line


def test_a_reader_of_an_s3_server_never_started_writes_nothing(project, tmp_path):
    """`easel gate` with the embedded server never started here: one line, and no credentials made."""
    fresh = tmp_path / "never-started"

    def elsewhere(params):
        params["storage"]["embedded"] = {"port": free_port(), "data_dir": str(fresh)}

    name = with_params(project, "fresh-s3.yaml", elsewhere)
    for args in (["gate"], ["registry", "list"], ["promote"]):
        line = assert_fails_cleanly(project, ["--params", name, *args], clean_env())
        assert "has never been started" in line and "easel s3 start" in line, line
    assert not fresh.exists()


def test_a_second_params_file_keeps_its_metrics_plots_and_logs_to_itself(project, monkeypatch, capsys):
    """`--params other.yaml` with its own `reporting` folders: the stage's metrics go there, and the
    project's data/ (its DVC-tracked metrics) is left as it was; a crash's log goes to its logs_dir."""
    import components.cli as cli

    def elsewhere(params):
        params["reporting"] = {"metrics_dir": "runs/b/metrics", "plots_dir": "runs/b/plots", "logs_dir": "runs/b/logs"}
        params["validate"]["out_dir"] = "runs/b/validate"

    name = with_params(project, "b.yaml", elsewhere)
    before = data_files(project)
    proc = easel(project, ["--params", name, "validate"], clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((project / "runs/b/metrics/validate.json").read_text())["accepted"] >= 1
    assert data_files(project) == before

    monkeypatch.chdir(project)
    monkeypatch.setattr(cli, "cmd_config", lambda args: {}["no such key"])
    assert cli.main(["--params", name, "config", "show"]) == 1
    line = capsys.readouterr().err.strip()
    assert Path(line.split("traceback in ")[1].split(";")[0]).parent == Path("runs/b/logs")
