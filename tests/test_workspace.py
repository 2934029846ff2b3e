"""The work folder of scheduled runs (flows/workspace.py): fetching the code, and one run at a time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import workspace

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def git(*args: str, cwd: Path) -> str:
    import os

    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(autouse=True)
def _restore_import_path(monkeypatch):
    """checkout() puts the fetched code first on the import path, as a run needs: undo it after each test."""
    import os

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


@pytest.fixture()
def origin(tmp_path) -> tuple[Path, Path]:
    """A bare repository (the remote) and a developer clone that pushes to it."""
    bare, dev = tmp_path / "origin.git", tmp_path / "dev"
    git("init", "--bare", "-q", "-b", "main", str(bare), cwd=tmp_path)
    git("clone", "-q", str(bare), str(dev), cwd=tmp_path)
    (dev / "dvc.lock").write_text("v1\n")
    (dev / ".gitignore").write_text("/data/download\n")
    git("add", "-A", cwd=dev)
    git("commit", "-qm", "one", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    return bare, dev


def test_checkout_clones_then_brings_the_clone_to_the_branch_and_keeps_ignored_files(origin, tmp_path):
    bare, dev = origin
    work = tmp_path / "work"
    first = workspace.checkout(str(bare), "main", str(work))
    assert first["directory"] == str(work.resolve()) and (work / "dvc.lock").read_text() == "v1\n"
    workspace.release(work)

    # A run changed a tracked file and left an ignored output; then the branch moved on.
    (work / "dvc.lock").write_text("the last run's lock\n")
    (work / "data" / "download").mkdir(parents=True)
    (work / "data" / "download" / "image.png").write_bytes(b"kept")
    (dev / "dvc.lock").write_text("v2\n")
    git("commit", "-qam", "two", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)

    second = workspace.checkout(str(bare), "", str(work))  # empty branch: main
    workspace.release(work)
    assert (work / "dvc.lock").read_text() == "v2\n"  # tracked files: the branch's newest commit
    assert (work / "data" / "download" / "image.png").read_bytes() == b"kept"  # ignored outputs stay
    assert second["commit"] == git("rev-parse", "HEAD", cwd=dev)


def test_checkout_refuses_what_it_cannot_do(origin, tmp_path):
    bare, dev = origin
    with pytest.raises(ValueError, match="set EASEL_GIT_REPOSITORY"):
        workspace.checkout("", "main", str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"is a clone of .*origin.git, not of"):
        workspace.checkout(str(tmp_path / "elsewhere.git"), "main", str(dev))
    with pytest.raises(RuntimeError, match=r"git clone .* failed"):
        workspace.checkout(str(bare), "no-such-branch", str(tmp_path / "w2"))
    for folder in ("w", "w2"):
        workspace.release(tmp_path / folder)
    workspace.release(dev)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows import workspace
    folder, log, name, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    workspace.hold(folder)
    with log.open("a") as fh:
        fh.write(f"{name} has it\\n")
    time.sleep(seconds)  # the run's work
    with log.open("a") as fh:
        fh.write(f"{name} done\\n")
    """
)


def test_two_runs_never_hold_the_same_folder_at_once(tmp_path):
    """A second run waits for the first to end (ordering only: no timing is asserted)."""
    log = tmp_path / "log.txt"
    folder = tmp_path / "work"
    repo = Path(__file__).resolve().parents[1]

    def start(name: str, seconds: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(log), name, seconds], cwd=repo)

    first = start("first", "3")
    while not log.exists():  # the first run holds the folder
        time.sleep(0.05)
    second = start("second", "0")
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    assert log.read_text().splitlines() == ["first has it", "first done", "second has it", "second done"]


def test_the_lock_is_reentrant_in_a_process_and_freed_with_the_block(tmp_path):
    with workspace.held(tmp_path / "w"):
        with workspace.held(tmp_path / "w"):  # the flow inside a pull step's hold
            pass
        assert workspace.lock_path(tmp_path / "w") in workspace._held  # still held by the outer block
    assert workspace.lock_path(tmp_path / "w") not in workspace._held
