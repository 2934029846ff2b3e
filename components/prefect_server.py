"""The local Prefect server as a service, like the embedded S3 server: `easel prefect start|stop|status`.

Its state (the SQLite database, Prefect's home) lives under `orchestration.prefect.data_dir`
(`.easel/prefect`). `start` migrates the database first, once per Prefect version and with no
short deadline: a fresh database takes over 20 s to migrate on a small machine, more than
Prefect's own start-up limit. Then it starts `prefect server start` bound to loopback, waits
until `/api/health` answers, and records its pid and port, so a later call finds it again and a
port held by another program is named instead of being taken for ours.

`client_env()` is what a client of the server needs (PREFECT_API_URL); `ui_url` is where a
person opens its runs, tasks and artifacts in a browser.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from components.config import NotifyParams, PrefectServerParams
from components.errors import EaselError
from components.fsutil import atomic_write_bytes
from components.procs import port_open, read_pid, spawn, stop

# A Prefect client that finds no PREFECT_API_URL starts a temporary server and waits this long for
# it; Prefect's 20 s default is shorter than a first migration takes on a cold 2-core machine.
EPHEMERAL_STARTUP_TIMEOUT_S = 600


class PrefectServerError(EaselError):
    """The local Prefect server cannot be started, or its port is another program's."""


def prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


@dataclass
class LocalPrefectServer:
    """`prefect server start` on loopback with its database under `data_dir`."""

    data_dir: Path
    port: int = 4200
    host: str = "127.0.0.1"

    @classmethod
    def from_params(cls, params: PrefectServerParams, root: Path | None = None) -> LocalPrefectServer:
        data_dir = Path(params.data_dir)
        if not data_dir.is_absolute():
            data_dir = (root or Path.cwd()) / data_dir
        return cls(data_dir=data_dir.resolve(), port=params.port, host=params.host)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def home(self) -> Path:
        return self.data_dir / "home"  # PREFECT_HOME: the database (prefect.db), profiles, storage

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "server.pid"

    @property
    def port_file(self) -> Path:
        return self.data_dir / "server.port"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def migrated_file(self) -> Path:
        return self.data_dir / "migrated.json"

    def client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url}

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_SERVER_API_PORT": str(self.port),
            # The UI's browser code calls the API at this address.
            "PREFECT_UI_API_URL": self.api_url,
        }
        return env

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def running_port(self) -> int | None:
        """The port of this data folder's running server (None when none runs)."""
        if self.pid() is None:
            return None
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def healthy(self, timeout_s: float = 3.0) -> bool:
        """/api/health answers `true`: a Prefect server, up and serving."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=timeout_s) as resp:
                return resp.status == 200 and resp.read().strip() == b"true"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def is_running(self) -> bool:
        """This data folder's server runs on this port and answers (a port held by another program is not ours)."""
        return self.running_port() == self.port and self.healthy()

    def migrate(self) -> bool:
        """Bring the database to this Prefect's schema, once per version; True if it ran now."""
        want = prefect_version()
        try:
            if json.loads(self.migrated_file.read_text()).get("prefect") == want:
                return False
        except (OSError, ValueError, AttributeError):
            pass
        self.home.mkdir(parents=True, exist_ok=True)
        prefect = _prefect_command()
        # No deadline: a migration that is cut off halfway is worse than a slow one.
        with open(self.log_file, "ab") as log:
            proc = subprocess.run(
                [prefect, "--no-prompt", "server", "database", "upgrade", "--yes"],
                env=self._server_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
            )
        if proc.returncode != 0:
            raise PrefectServerError(f"the Prefect database in {self.home} did not migrate; see {self.log_file}")
        atomic_write_bytes(self.migrated_file, json.dumps({"prefect": want}).encode())
        return True

    def start(self, timeout_s: float = 300.0) -> bool:
        """Start the server unless it already runs. Returns True if this call started it."""
        if self.is_running():
            return False
        elsewhere = self.running_port()
        if self.pid() is not None and elsewhere != self.port:
            raise PrefectServerError(
                f"the Prefect server of {self.data_dir} runs on port {elsewhere or 'unknown'} (pid {self.pid()}), "
                f"not on orchestration.prefect.port {self.port}; run `easel prefect stop`, then `easel prefect start`"
            )
        if self.pid() is not None:  # ours, on this port, but not answering: a hung server
            self.stop()
        if port_open(self.port, self.host):
            raise PrefectServerError(
                f"port {self.port} on {self.host} is taken by another program; set orchestration.prefect.port "
                "in params.yaml to a free port, or point PREFECT_API_URL at the server you use"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.migrate()
        env = self._server_env() | {"PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false"}
        args = [_prefect_command(), "--no-prompt", "server", "start", "--host", self.host, "--port", str(self.port)]
        proc = spawn(args, self.pid_file, self.log_file, env, self.data_dir)
        atomic_write_bytes(self.port_file, str(self.port).encode())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PrefectServerError(f"the Prefect server exited with code {proc.returncode}; see {self.log_file}")
            if self.healthy():
                return True
            time.sleep(0.5)
        self.stop()
        raise PrefectServerError(f"the Prefect server did not answer in {timeout_s:.0f} s; see {self.log_file}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop this data folder's server if it runs. Returns True if one was stopped."""
        return stop(self.pid_file, timeout_s)


def _prefect_command() -> str:
    # The project's venv has `prefect` beside this interpreter; PATH may not include it.
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.is_file() else "prefect"


def ensure_ephemeral_timeout() -> None:
    """Give Prefect's temporary server (no PREFECT_API_URL) time to migrate a fresh database.

    Takes effect for the Prefect settings read after it: call it before Prefect is imported.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))


@contextlib.contextmanager
def local_server(project_dir: Path | str = ".", params_path: Path | str | None = None) -> Iterator[str | None]:
    """Point this process's Prefect client at the project's local server, started if need be; yields its UI address.

    Does nothing (yields None) when PREFECT_API_URL is already set: that server is the user's
    choice. Otherwise starts (or finds) the server `orchestration.prefect` describes, for this block
    and for the processes it starts.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    from components.config import load_params

    project_dir = Path(project_dir)
    params = load_params(Path(params_path) if params_path else project_dir / "params.yaml")
    server = LocalPrefectServer.from_params(params.orchestration.prefect, project_dir)
    server.start()
    os.environ.update(server.client_env())  # the processes this one starts
    # Prefect reads its settings when it is imported: tell the settings of this process too.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.ui_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


# -- the automation that tells someone ------------------------------------------------------------

AUTOMATION_NAME = "easel-run-needs-attention"
PIPELINE_FLOWS = ["easel-pipeline", "easel-pipeline-dask"]
WEBHOOK_URL_ENV = "EASEL_NOTIFY_WEBHOOK_URL"  # a secret (Slack's URLs hold a token): environment only


def automation_spec(notify: NotifyParams, block_document_id: str):
    """The automation: a pipeline run that ends in one of `notify.states` sends the block a notification."""
    from datetime import timedelta

    from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification

    return AutomationCore(
        name=AUTOMATION_NAME,
        description="Easel: tell someone when a pipeline run leaves production as it is (Rejected, "
        "Inconclusive) or fails. Made by `easel prefect automation` from orchestration.notify.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": PIPELINE_FLOWS},
            expect={f"prefect.flow-run.{state}" for state in notify.states},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject="Easel: {{ flow_run.name }} ended {{ flow_run.state.name }}",
                body=(
                    "Easel pipeline run {{ flow_run.name }} ({{ deployment.name if deployment else 'no deployment' }}) "
                    "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n{{ flow_run|ui_url }}"
                ),
            )
        ],
    )


async def _ensure_automation(notify: NotifyParams, webhook_url: str | None) -> tuple[str, str]:
    from prefect.client.orchestration import get_client

    if webhook_url:
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        block = CustomWebhookNotificationBlock(
            name="easel", url=webhook_url, json_data={"text": "{{subject}}\n{{body}}"}
        )
        await block.save(notify.block, overwrite=True)
    async with get_client() as client:
        documents = [d for d in await client.read_block_documents() if d.name == notify.block]
        if not documents:
            raise EaselError(
                f"orchestration.notify.block: no block named {notify.block!r} on the Prefect server; create one "
                f"(a Slack webhook, e-mail... in the UI, or set {WEBHOOK_URL_ENV} for a webhook) and run this again"
            )
        spec = automation_spec(notify, str(documents[0].id))
        existing = await client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            await client.update_automation(existing[0].id, spec)
            for extra in existing[1:]:
                await client.delete_automation(extra.id)
            return str(existing[0].id), "updated"
        return str(await client.create_automation(spec)), "created"


def ensure_automation(notify: NotifyParams, webhook_url: str | None = None) -> tuple[str, str]:
    """Create (or bring up to date) the automation on the server PREFECT_API_URL names; (id, what was done).

    With `webhook_url`, the notification block `notify.block` is (re)written as a custom webhook
    posting `{"text": subject + body}` (what Slack's and most chat webhooks read) first.
    """
    import asyncio

    return asyncio.run(_ensure_automation(notify, webhook_url))
