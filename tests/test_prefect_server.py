"""The local Prefect server as a service (`easel prefect start|stop|status`), Prefect's temporary
server on a fresh machine, and the automation that notifies on Rejected, Inconclusive or Failed runs,
all against real Prefect servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def easel(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / ".venv/bin/easel"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def params_with_prefect(folder: Path, port: int) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["orchestration"]["prefect"] = {"host": "127.0.0.1", "port": port, "data_dir": ".easel/prefect"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder / "params.yaml"


def test_easel_prefect_start_status_stop(tmp_path):
    """Start migrates once and waits for health; a second start finds it; its port is checked like S3's."""
    from components.prefect_server import LocalPrefectServer

    port = free_port()
    params_with_prefect(tmp_path, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    started = easel(["prefect", "start"], tmp_path, env)
    try:
        assert started.returncode == 0, started.stderr
        assert f"Prefect server started: UI http://127.0.0.1:{port}" in started.stdout
        server = LocalPrefectServer(tmp_path / ".easel/prefect", port=port)
        assert server.answers() and (server.home / "prefect.db").is_file()  # the database is the project's
        assert json.loads(server.migrated_file.read_text())["prefect"]
        assert "already running" in easel(["prefect", "start"], tmp_path, env).stdout
        assert "running" in easel(["prefect", "status"], tmp_path, env).stdout
        # The same data folder on another port: named, not a second server on one database.
        params_with_prefect(tmp_path, free_port())
        moved = easel(["prefect", "start"], tmp_path, env)
        assert moved.returncode == 2 and f"runs on port {port}" in moved.stderr, moved.stderr
        params_with_prefect(tmp_path, port)
    finally:
        assert easel(["prefect", "stop"], tmp_path, env).stdout.strip() == "stopped"
    assert "not running" in easel(["prefect", "status"], tmp_path, env).stdout
    assert not server.migrate()  # migrated once per Prefect version: the next start does not migrate again

    with socket.socket() as holder:  # a port another program holds
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        params_with_prefect(tmp_path, holder.getsockname()[1])
        taken = easel(["prefect", "start"], tmp_path, env)
        assert taken.returncode == 2 and "is taken by another program" in taken.stderr, taken.stderr
        assert "orchestration.prefect.port" in taken.stderr


def test_a_flow_with_no_server_on_a_fresh_machine(tmp_path):
    """No PREFECT_API_URL, a new PREFECT_HOME: Prefect's temporary server must migrate a new database
    first, which takes longer than its 20 s start-up limit on a cold 2-core machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    code = (
        "import flows\n"
        "from prefect import flow\n"
        "from prefect.settings import get_current_settings\n"
        "print('timeout', get_current_settings().server.ephemeral.startup_timeout_seconds)\n"
        "@flow\n"
        "def probe():\n"
        "    return 'ran'\n"
        "print(probe())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timeout 600" in proc.stdout and proc.stdout.strip().endswith("ran")
    # The same setting for `prefect` commands run in the project root (pyproject.toml's [tool.prefect]).
    shown = subprocess.run(
        [str(REPO / ".venv/bin/prefect"), "config", "view", "--show-sources"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS='600'" in shown.stdout, shown.stdout[-2000:]


class Webhook:
    """A chat webhook stand-in on 127.0.0.1: records each JSON body posted to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return list(self.received)


async def end_runs(api_url: str, endings: dict[str, object]) -> None:
    """Runs of a flow named as the pipeline, each taken to its final state through the API, as the
    engine does (the server emits `prefect.flow-run.<state name>` events from these transitions)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending, Running

    @flow(name="easel-pipeline")
    def pipeline_stand_in() -> None:  # only its name matters: no code of it runs
        pass

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            for name, state in endings.items():
                run = await client.create_flow_run(pipeline_stand_in, name=name, state=Pending())
                await client.set_flow_run_state(run.id, Running())
                await client.set_flow_run_state(run.id, state)


def test_the_automation_notifies_when_production_stays_or_a_run_fails(prefect_server, tmp_path):
    """`easel prefect automation` creates the automation on the real server; runs that end Rejected,
    Inconclusive or Failed post to the webhook, a promoting run does not; running it again updates it."""
    from prefect.states import Completed, Failed

    hook = Webhook()
    params_with_prefect(tmp_path, free_port())  # not used: PREFECT_API_URL names the server
    env = {**prefect_server, "EASEL_NOTIFY_WEBHOOK_URL": hook.url}
    made = easel(["prefect", "automation"], tmp_path, env)
    assert made.returncode == 0 and "automation created" in made.stdout, made.stdout + made.stderr
    assert hook.url not in made.stdout + made.stderr  # the webhook URL is a secret
    again = easel(["prefect", "automation"], tmp_path, env)
    assert again.returncode == 0 and "automation updated" in again.stdout, again.stderr

    asyncio.run(
        end_runs(
            prefect_server["PREFECT_API_URL"],
            {
                "run-rejected": Completed(name="Rejected", message="gate verdict: reject"),
                "run-promoted": Completed(),
                "run-failed": Failed(message="stage train failed"),
                "run-inconclusive": Completed(name="Inconclusive"),
            },
        )
    )
    posts = hook.wait_for(3)
    texts = sorted(post["text"] for post in posts)
    assert len(texts) == 3, texts
    assert any("run-rejected ended Rejected" in t for t in texts)
    assert any("run-failed ended Failed" in t and "stage train failed" in t for t in texts)
    assert any("run-inconclusive ended Inconclusive" in t for t in texts)
    time.sleep(3)
    assert not any("run-promoted" in post["text"] for post in hook.received)

    # Without a webhook and with no block of that name, it says what to create.
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["orchestration"]["notify"]["block"] = "nobody-made-this"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    missing = easel(["prefect", "automation"], tmp_path, prefect_server)
    assert missing.returncode == 2 and "no block named 'nobody-made-this'" in missing.stderr, missing.stderr
    shutil.rmtree(tmp_path / ".easel", ignore_errors=True)
