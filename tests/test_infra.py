"""infra/ cannot run here (no Docker engine, no cluster, no GPU): validate it statically with the
real linters and schemas, and check that its commands are the ones the tests run locally."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tools(infra_tools) -> Path:
    """The validators, pinned, in a venv of their own (tests/conftest.py)."""
    return infra_tools


def run(args, **kw):
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_dockerfile_passes_hadolint(tools):
    run([str(tools / "hadolint"), "infra/docker/Dockerfile"])  # not even an info-level finding


def test_compose_file_matches_the_compose_spec(tools):
    run([str(tools / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "infra/docker/docker-compose.yml"])


def test_workflow_matches_the_github_schema(tools):
    run(
        [
            str(tools / "check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            ".github/workflows/eval-gate.yml",
        ]
    )


K8S = ("infra/k8s/worker.yaml", "infra/k8s/prefect-server.yaml", "infra/k8s/s3-secret.example.yaml")


def test_kubernetes_manifests_are_valid(tools):
    proc = subprocess.run(
        [str(tools / "kubernetes-validate"), "--strict", *K8S], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("passed for resource") == 11  # every resource was checked
    template = json.loads((REPO / "infra/k8s/base-job-template.json").read_text())
    assert template["job_configuration"]["job_manifest"]["kind"] == "Job" and "variables" in template
    # What a Prefect server and the Kubernetes worker make of it: tests/test_kubernetes.py.


def test_accelerate_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        "single_gpu.yaml": ("NO", 1),
        "ddp_8gpu.yaml": ("MULTI_GPU", 8),
        "multinode_2x8gpu.yaml": ("MULTI_GPU", 16),
    }
    # Every config shipped is launched by tests/test_train_distributed.py; FSDP and DeepSpeed are not
    # shipped: neither can run on this project's CPU machines (see infra/README.md).
    assert {p.name for p in (REPO / "infra" / "accelerate").glob("*.yaml")} == set(expected)
    for name, (kind, processes) in expected.items():
        config = load_config_from_file(str(REPO / "infra" / "accelerate" / name))
        assert (str(config.distributed_type).split(".")[-1], config.num_processes) == (kind, processes), name
        assert config.mixed_precision == "bf16"


def test_infra_commands_are_the_tested_ones():
    pool = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]["process"]["name"]
    compose = yaml.safe_load((REPO / "infra/docker/docker-compose.yml").read_text())["services"]
    worker = compose["worker"]["command"]
    assert worker[:5] == [".venv/bin/prefect", "worker", "start", "--pool", pool]  # as test_deployments runs
    dockerfile = (REPO / "infra/docker/Dockerfile").read_text()
    assert f'CMD [".venv/bin/prefect", "worker", "start", "--pool", "{pool}"]' in dockerfile
    assert "RUN bash infra/easel.sh setup" in dockerfile  # the README's own setup
    # The S3 service runs the same `weed mini` as the embedded server, with the flags it uses.
    s3 = compose["s3"]["command"]
    source = (REPO / "components/storage.py").read_text()
    assert s3[0] == "mini"
    for flag in s3[1:]:
        name = flag.split("=")[0]
        assert name == "-dir" or name.lstrip("-") in source, f"{name}: not what `easel s3 start` runs"


def test_the_kubernetes_manifests_start_everything_they_refer_to():
    """No shared disk and nothing missing: the worker's Prefect API is the Service that
    prefect-server.yaml starts (which serves the pods of its Deployment, the only volume being the
    server's database claim), and the ConfigMap and Secret the flow-run pods read are defined."""
    docs = [d for path in K8S for d in yaml.safe_load_all((REPO / path).read_text())]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert {d["metadata"].get("namespace", "easel") for d in docs if d["kind"] != "Namespace"} == {"easel"}
    worker = by_kind["Deployment"]["easel-worker"]["spec"]["template"]["spec"]["containers"][0]
    api_url = {e["name"]: e["value"] for e in worker["env"]}["PREFECT_API_URL"]
    host, port = api_url.split("//")[1].split("/")[0].split(":")
    service_name, namespace = host.split(".")[:2]
    service = by_kind["Service"][service_name]
    assert namespace == "easel" and int(port) == service["spec"]["ports"][0]["port"]
    server = by_kind["Deployment"][service_name]["spec"]["template"]
    assert service["spec"]["selector"].items() <= server["metadata"]["labels"].items()
    (container,) = server["spec"]["containers"]
    assert container["command"][:3] == [".venv/bin/prefect", "server", "start"]
    assert container["ports"][0]["containerPort"] == int(port)
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in server["spec"]["volumes"]]
    assert claim in by_kind["PersistentVolumeClaim"]
    assert [d for d in docs if d["kind"] == "PersistentVolumeClaim"] == [by_kind["PersistentVolumeClaim"][claim]]
    # The flow-run pods: no volume; their settings and keys exist.
    template = json.loads((REPO / "infra/k8s/base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
    refs = pod["containers"][0]["envFrom"]
    assert [r["configMapRef"]["name"] for r in refs if "configMapRef" in r] == ["easel-settings"]
    assert [r["secretRef"]["name"] for r in refs if "secretRef" in r] == ["easel-s3"]
    assert by_kind["ConfigMap"]["easel-settings"]["data"]["EASEL_GIT_REPOSITORY"]
    assert "easel-s3" in by_kind["Secret"]
