"""The README's setup step (infra/easel.sh setup): uv installs the lock from wherever pip is
configured to find packages, and the Docker image copies every file the setup reads."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def uv_install_module():
    spec = importlib.util.spec_from_file_location("uv_install", REPO / "infra/uv_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uv_is_pointed_where_pip_is_configured_to_look(monkeypatch):
    """A machine whose packages come from a mirror and a wheel folder (pip's PIP_* settings, read
    through the real `pip config list`): uv gets the same sources, and a failure's log hides the
    mirror's password."""
    uv_install = uv_install_module()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # only the settings below, not this machine's
    monkeypatch.setenv("PIP_INDEX_URL", "https://builder:s3cret@mirror.example/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///opt/a/simple file:///opt/b/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "mirror.example")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/corporate.pem")

    settings = uv_install.pip_settings(str(REPO / ".venv/bin/python"))
    arguments, environment = uv_install.uv_arguments(settings)

    assert arguments == [
        "--default-index", "https://builder:s3cret@mirror.example/simple",
        "--extra-index-url", "file:///opt/a/simple",
        "--extra-index-url", "file:///opt/b/simple",
        "--find-links", "/opt/wheels",
        "--allow-insecure-host", "mirror.example",
    ]  # fmt: skip
    assert environment == {"SSL_CERT_FILE": "/etc/ssl/certs/corporate.pem"}
    shown = [uv_install.without_credentials(a) for a in arguments]
    assert "https://mirror.example/simple" in shown and not any("s3cret" in a for a in shown)


def test_uv_gets_nothing_extra_where_pip_has_no_settings(monkeypatch):
    uv_install = uv_install_module()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST", "PIP_CERT"):
        monkeypatch.delenv(name, raising=False)
    assert uv_install.uv_arguments(uv_install.pip_settings(str(REPO / ".venv/bin/python"))) == ([], {})


def test_the_docker_image_copies_every_file_the_setup_reads():
    """The image runs `bash infra/easel.sh setup` before the project is copied in: each file the
    script reads must be in place (at its path in the project) ahead of it."""
    script = (REPO / "infra/easel.sh").read_text()
    needed = set(re.findall(r'"\$ROOT/([\w./-]+)"', script)) - {".venv"}  # .venv: made by the setup
    assert {"infra/uv_install.py", "infra/requirements.lock", "pyproject.toml"} <= needed
    dockerfile = (REPO / "infra/docker/Dockerfile").read_text()
    in_place = set()  # paths relative to the WORKDIR, which is the project root
    for line in dockerfile.split("RUN bash infra/easel.sh setup")[0].splitlines():
        if line.startswith("COPY "):
            *sources, target = [word for word in line.split()[1:] if not word.startswith("--")]
            folder = target.removeprefix("./")
            in_place |= {folder + source.rsplit("/", 1)[-1] if target.endswith("/") else target for source in sources}
    assert not needed - in_place, f"infra/docker/Dockerfile runs the setup without {sorted(needed - in_place)}"


def test_an_unknown_installer_is_refused_in_one_line_before_anything_is_installed():
    stamp = REPO / ".venv/.easel-install-stamp"
    before = stamp.read_bytes() if stamp.exists() else None
    proc = subprocess.run(
        ["bash", "infra/easel.sh", "setup"],
        cwd=REPO,
        env=os.environ | {"EASEL_INSTALLER": "conda"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["easel.sh: EASEL_INSTALLER must be uv or pip; got 'conda'"]
    assert (stamp.read_bytes() if stamp.exists() else None) == before  # the installed venv is left as it was


def shell_variable(script: str, name: str) -> str:
    """The value of a double-quoted assignment in a bash script, as bash reads it (backslash-newline
    inside double quotes joins the lines)."""
    return re.search(rf'^{name}="(.*?)"$', script, re.S | re.M).group(1).replace("\\\n", "")


def test_the_setup_s_bytecode_step_runs_before_the_project_is_copied_in(tmp_path):
    """The Docker image sets up with only pyproject.toml and the package markers of the project in
    place: the import check and the compile step must not need the project's own modules (the import
    check once imported components.cli, which is not there yet), and a package named for the compile
    step must exist."""
    script = (REPO / "infra/easel.sh").read_text()
    for marker in ("components/__init__.py", "flows/__init__.py"):
        (tmp_path / marker).parent.mkdir()
        (tmp_path / marker).write_text("")
    # The suite's venv, without its .pth files (-S): its editable install of this project would find
    # the whole of components/ here; the image's finds the folder above.
    python = [str(REPO / ".venv/bin/python"), "-S"]
    env = os.environ | {"PYTHONPATH": sysconfig.get_paths()["purelib"]}
    warm = subprocess.run([*python, "-c", shell_variable(script, "WARM_IMPORTS")], cwd=tmp_path, env=env)
    assert warm.returncode == 0
    packages = shell_variable(script, "LAZY_PACKAGES").split()
    assert "diffusers" in packages and "transformers" in packages
    compile_step = subprocess.run(
        [*python, "-c", shell_variable(script, "COMPILE_PACKAGES"), *packages], cwd=tmp_path, env=env, timeout=600
    )
    assert compile_step.returncode == 0
    module = importlib.util.find_spec("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
    assert os.path.isfile(module.cached)  # loaded only when a stage loads a pipeline


def tiny_wheel(folder) -> str:
    """A one-module wheel, made here: the package uv installs in the link-mode test."""
    import base64
    import hashlib
    import zipfile

    files = {
        "tinypkg/__init__.py": b"VALUE = 1\n",
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: easel-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    )
    files["tinypkg-1.0.dist-info/RECORD"] = (record + "tinypkg-1.0.dist-info/RECORD,,\n").encode()
    wheel = folder / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel.as_uri()


def test_uv_links_the_packages_from_its_cache_where_it_can_and_copies_them_elsewhere(tmp_path):
    """A fresh setup with uv's cache on the venv's filesystem holds the unpacked wheels once (hard
    links), not twice; with the cache on another filesystem (/dev/shm, a tmpfs) it copies, silently."""
    uv = shutil.which("uv", path=str(REPO / ".venv/bin"))
    if uv is None:  # then the setup never runs uv_install.py
        pytest.skip("this venv was set up with EASEL_INSTALLER=pip; uv is not in it")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"tinypkg @ {tiny_wheel(tmp_path)}\n")
    caches = {"same": tmp_path / "uv-cache"}
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        caches["other"] = Path(tempfile.mkdtemp(dir=shm)) / "uv-cache"
    links = {}
    try:
        for name, cache in caches.items():
            venv = tmp_path / f"venv-{name}"
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            env = {k: v for k, v in os.environ.items() if k != "UV_LINK_MODE"} | {"UV_CACHE_DIR": str(cache)}
            done = subprocess.run(
                [sys.executable, str(REPO / "infra/uv_install.py"), str(venv / "bin/python"), uv, str(requirements)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert "hardlink" not in done.stderr  # no "failed to hardlink; falling back to copy" warning
            links[name] = next(venv.glob("lib/python*/site-packages/tinypkg/__init__.py")).stat().st_nlink
    finally:
        if "other" in caches:
            shutil.rmtree(caches["other"].parent, ignore_errors=True)
    assert links == {"same": 2, "other": 1} if "other" in caches else {"same": 2}


@pytest.mark.parametrize(
    ("need", "said"),
    [
        ("1e9", "the tests need about 1e+09 GB free in {tmp} (TMPDIR)"),  # stands in for a full disk
        ("lots", "EASEL_TEST_MIN_FREE_GB must be a number of GB, 0 or more; got 'lots'"),
        ("-1", "EASEL_TEST_MIN_FREE_GB must be a number of GB, 0 or more; got '-1'"),
    ],
)
def test_too_little_disk_for_the_tests_is_said_in_one_line_before_any_test(tmp_path, need, said):
    """tests/conftest.py: pytest_sessionstart."""
    env = os.environ | {"EASEL_TEST_MIN_FREE_GB": need, "TMPDIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "tests/test_scratch.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    assert said.format(tmp=tmp_path) in run.stdout + run.stderr
    assert "passed" not in run.stdout
