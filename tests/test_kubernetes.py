"""The Kubernetes work pool against a real Prefect server: `prefect work-pool create` with Easel's
base job template, then the real Kubernetes worker (infra/k8s/worker.yaml's command) submits a
deployment's flow run to a stand-in Kubernetes API, and the Job it sends is checked and validated
against the Kubernetes schema. No cluster here: the stand-in records the request and answers 201."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, prefect_cli, running_prefect_server

pytestmark = pytest.mark.slow

TEMPLATE = REPO / "infra/k8s/base-job-template.json"
REPOSITORY = "https://git.example.com/easel/easel.git"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_prefect_server(tmp_path_factory.mktemp("prefect")) as env:
        yield env


def prefect(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return prefect_cli(args, env, check=check, timeout=120)


async def api(env: dict[str, str], call):
    """`call(client)` with a client of the test server (never an ephemeral one)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        async with get_client() as client:
            return await call(client)


class FakeKubernetesAPI(ThreadingHTTPServer):
    """Answers the Job creation like the API server does (201, the Job with a name); records every request."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                outer.requests.append(("POST", self.path, body))
                if self.path.startswith("/apis/batch/v1/namespaces/") and self.path.endswith("/jobs"):
                    job = copy.deepcopy(body)
                    job["metadata"]["name"] = job["metadata"].get("generateName", "job-") + "x7k2p"
                    job["metadata"]["namespace"] = self.path.split("/")[5]
                    job["metadata"]["uid"] = str(uuid.uuid4())
                    self._reply(201, job)
                else:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

            def do_GET(self):
                outer.requests.append(("GET", self.path, None))
                self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@pytest.fixture()
def kubernetes_api():
    fake = FakeKubernetesAPI()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.shutdown()
    fake.server_close()


def worker_command() -> list[str]:
    """The worker's command in infra/k8s/worker.yaml, with this checkout's venv."""
    docs = list(yaml.safe_load_all((REPO / "infra/k8s/worker.yaml").read_text()))
    worker = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    command = worker["command"]
    assert command[0] == ".venv/bin/prefect"
    return [str(REPO / command[0]), *command[1:]]


def test_a_kubernetes_worker_turns_a_deployment_run_into_an_easel_job(server, kubernetes_api, tmp_path, infra_tools):
    """The pool takes the template unchanged; the worker submits a Job with the Easel image, the
    deployment's EASEL_GIT_REPOSITORY, Prefect's own variables, the S3 secret and the GPU limit."""
    template = json.loads(TEMPLATE.read_text())
    prefect(
        ["work-pool", "create", "easel-kubernetes", "--type", "kubernetes", "--base-job-template", str(TEMPLATE)],
        server,
    )
    stored = json.loads(prefect(["work-pool", "inspect", "easel-kubernetes", "--output", "json"], server).stdout)
    assert stored["type"] == "kubernetes"
    assert stored["base_job_template"] == template  # kept as the file has it

    # prefect.yaml's weekly deployment on this pool, with the job variables infra/README.md shows.
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (weekly,) = [d for d in project["deployments"] if d["name"] == "weekly-retrain-and-gate"]
    weekly["work_pool"] = {
        "name": "easel-kubernetes",
        "job_variables": {"env": {"EASEL_GIT_REPOSITORY": REPOSITORY}, "memory_limit": "64Gi"},
    }
    project["deployments"] = [weekly]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(project, sort_keys=False))
    prefect(["deploy", "--prefect-file", str(prefect_file), "--name", "weekly-retrain-and-gate"], server)
    output = prefect(
        ["deployment", "run", "easel-pipeline/weekly-retrain-and-gate", "--job-variable", "gpu_count=2"], server
    ).stdout
    flow_run = asyncio.run(api(server, lambda client: client.read_flow_run(output.split("UUID:")[1].split()[0])))
    assert flow_run.job_variables == {"gpu_count": 2}

    env = {
        **server,
        "KUBECONFIG": str(kubernetes_api.kubeconfig(tmp_path / "kubeconfig")),
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED": "false",  # it would watch a real cluster
        "AWS_SECRET_ACCESS_KEY": "the-workers-own-secret",  # a key in the worker's own environment
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config of a CI pod
    worker = subprocess.run(
        [*worker_command(), "--run-once"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    output = worker.stdout[-4000:] + worker.stderr[-4000:]
    assert worker.returncode == 0, output
    posts = [(path, body) for method, path, body in kubernetes_api.requests if method == "POST"]
    assert [path for path, _ in posts] == ["/apis/batch/v1/namespaces/easel/jobs"], (kubernetes_api.requests, output)
    job = posts[0][1]
    assert "created in namespace 'easel'" in output and f"Flow run '{flow_run.name}' submitted" in output, output
    submitted = asyncio.run(api(server, lambda client: client.read_flow_run(flow_run.id)))
    assert submitted.state.is_pending()  # the pod would take it from here

    assert "the-workers-own-secret" not in json.dumps(job)  # jobs read the Secret; the manifest holds no key

    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "easel-worker:gpu"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    # The cluster's settings (the default repository) and the S3 keys, from the ConfigMap and Secret.
    assert container["envFrom"] == [{"configMapRef": {"name": "easel-settings"}}, {"secretRef": {"name": "easel-s3"}}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 2, "memory": "64Gi"}, "requests": {}}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    job_env = {e["name"]: e["value"] for e in container["env"]}
    assert job_env["EASEL_GIT_REPOSITORY"] == REPOSITORY  # the deployment's value, over the ConfigMap's
    assert job_env["EASEL_WORK_DIR"] == "/work/easel-work" and "EASEL_GIT_BRANCH" not in job_env  # the ConfigMap's
    assert job_env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert job_env["PREFECT_API_URL"] == server["PREFECT_API_URL"]  # the worker's own
    assert job_env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"  # backoffLimit 0: evicted runs rerun
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "easel-run"
    assert job["metadata"]["namespace"] == "easel"
    assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(flow_run.id)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 86400

    # prefect-kubernetes insists on `parallelism` and `completions` in the pod spec (it refuses a
    # template without them), but they are Job fields, not PodSpec ones: the API server drops them
    # (an unknown field is dropped, with a warning, unless the client asks for strict validation,
    # which the worker does not). Everything else must pass the strict schema. The validator
    # wants a name: the one the API server gives the Job from generateName.
    job["metadata"]["name"] = job["metadata"]["generateName"] + "x7k2p"
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    validate = [str(infra_tools / "kubernetes-validate"), "--strict", str(manifest)]
    proc = subprocess.run(validate, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "('completions', 'parallelism' were unexpected)" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    manifest.write_text(yaml.safe_dump(job))
    proc = subprocess.run(validate, capture_output=True, text=True)
    assert proc.returncode == 0 and "passed for resource job/" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_server_refuses_a_template_with_an_undeclared_placeholder(server, tmp_path):
    """The server itself checks every {{ placeholder }} against the variables, not only the CLI."""
    template = json.loads(TEMPLATE.read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"  # not a declared variable
    bad = tmp_path / "bad-template.json"
    bad.write_text(json.dumps(template))
    proc = prefect(
        ["work-pool", "create", "easel-bad", "--type", "kubernetes", "--base-job-template", str(bad)],
        server,
        check=False,
    )
    assert proc.returncode != 0
    assert "undeclared variable(s): gpus" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # The same body straight to the REST API is refused there: the check is the server's.
    request = urllib.request.Request(
        server["PREFECT_API_URL"] + "/work_pools/",
        data=json.dumps({"name": "easel-bad", "type": "kubernetes", "base_job_template": template}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 422
    assert "undeclared variable(s): gpus" in refused.value.read().decode()


def test_the_server_checks_a_runs_job_variables_against_the_template(server):
    """The variables' schema is enforced too: a run asking for -1 GPUs is refused when it is created."""
    from prefect.exceptions import PrefectHTTPStatusError

    template = json.loads(TEMPLATE.read_text())
    prefect(
        ["work-pool", "create", "easel-schema", "--type", "kubernetes", "--base-job-template", str(TEMPLATE)], server
    )

    async def runs(client):
        flow_id = await client.create_flow_from_name("easel-pipeline")
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name="schema-check", work_pool_name="easel-schema"
        )
        ok = await client.create_flow_run_from_deployment(deployment_id, job_variables={"gpu_count": 0})
        try:
            await client.create_flow_run_from_deployment(deployment_id, job_variables={"gpu_count": -1})
        except PrefectHTTPStatusError as exc:
            return ok, exc
        return ok, None

    ok, refused = asyncio.run(api(server, runs))
    assert ok.job_variables == {"gpu_count": 0}
    assert refused is not None and refused.response.status_code == 422
    assert "'gpu_count'" in refused.response.text and "less than the minimum of 0" in refused.response.text
    assert template["variables"]["properties"]["gpu_count"]["minimum"] == 0
