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
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from components.config import NotifyParams, PrefectServerParams
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_write_bytes
from components.plumbing.procs import LoopbackService

# A Prefect client that finds no PREFECT_API_URL starts a temporary server and waits this long for
# it; Prefect's 20 s default is shorter than a first migration takes on a cold 2-core machine.
EPHEMERAL_STARTUP_TIMEOUT_S = 600


class PrefectServerError(EaselError):
    """The local Prefect server cannot be started, or its port is another program's."""


def prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


@dataclass
class LocalPrefectServer(LoopbackService):
    """`prefect server start` on loopback with its database under `data_dir`."""

    port: int = 4200
    title: ClassVar[str] = "the Prefect server"
    port_key: ClassVar[str] = "orchestration.prefect.port"
    command: ClassVar[str] = "easel prefect"
    error: ClassVar[type[Exception]] = PrefectServerError

    @classmethod
    def from_params(cls, params: PrefectServerParams, root: Path | None = None) -> LocalPrefectServer:
        return cls.in_project(params.data_dir, params.port, root, host=params.host)

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
    def migrated_file(self) -> Path:
        return self.data_dir / "migrated.json"

    def client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url}

    def _server_env(self) -> dict[str, str]:
        # Another server's or client's settings stay out; the server's own services' settings pass
        # (e.g. PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS: how often schedules are turned into runs).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {k: v for k, v in os.environ.items() if k.startswith("PREFECT_SERVER_SERVICES_")}
        env |= {
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_SERVER_API_PORT": str(self.port),
            # The UI's browser code calls the API at this address.
            "PREFECT_UI_API_URL": self.api_url,
        }
        return env

    def answers(self) -> bool:
        """/api/health answers `true`: a Prefect server, up and serving."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=3) as resp:
                return resp.status == 200 and resp.read().strip() == b"true"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def elsewhere_hint(self) -> str:
        return ", or point PREFECT_API_URL at the server you use"

    def migrate(self) -> bool:
        """Bring the database to this Prefect's schema, once per version; True if it ran now."""
        want = prefect_version()
        try:
            if json.loads(self.migrated_file.read_text()).get("prefect") == want:
                return False
        except (OSError, ValueError, AttributeError):
            pass
        self.home.mkdir(parents=True, exist_ok=True)
        # No deadline: a migration that is cut off halfway is worse than a slow one.
        with open(self.log_file, "ab") as log:
            proc = subprocess.run(
                [_prefect_command(), "--no-prompt", "server", "database", "upgrade", "--yes"],
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
        self.claim_port()
        self.migrate()
        env = self._server_env() | {"PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false"}
        args = [_prefect_command(), "--no-prompt", "server", "start", "--host", self.host, "--port", str(self.port)]
        self.launch(args, env, timeout_s)
        return True


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
