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


EXEC_HOLDER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from flows import workspace
    folder, log = Path(sys.argv[1]), Path(sys.argv[2])
    workspace.hold(folder)  # the pull step
    program = (
        "import signal, sys, time\\n"
        "from pathlib import Path\\n"
        "from flows import workspace\\n"
        "signal.alarm(30)  # waiting on a lock this very process holds would never end\\n"
        "folder, log = Path(sys.argv[1]), Path(sys.argv[2])\\n"
        "log.write_text('started')  # the engine starts up: the gap in which a lock could be lost\\n"
        "while not (log.parent / 'probed').exists():\\n"
        "    time.sleep(0.05)\\n"
        "workspace.hold(folder)  # the flow, in the engine the supervisor exec'd\\n"
        "log.write_text('adopted')\\n"
        "while not (log.parent / 'release').exists():\\n"
        "    time.sleep(0.05)\\n"
    )
    os.execv(sys.executable, [sys.executable, "-c", program, str(folder), str(log)])
    """
)


def test_the_lock_survives_the_exec_of_the_flow_engine(tmp_path):
    """Prefect's workspace supervisor runs the pull step, then execs the engine: the folder must stay
    held across that exec (no second run's checkout in between), and the engine's own `hold` must
    take over the inherited lock rather than wait for it."""
    import fcntl
    import os

    folder, log = tmp_path / "work", tmp_path / "log.txt"
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.Popen([sys.executable, "-c", EXEC_HOLDER, str(folder), str(log)], cwd=repo)

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60
        while run.poll() is None and time.monotonic() < deadline:
            if log.exists() and log.read_text() == text:
                return
            time.sleep(0.05)
        raise AssertionError(f"the exec'd engine never said {text!r} (exit {run.poll()})")

    try:
        wait_for("started")
        other = os.open(workspace.lock_path(folder), os.O_RDWR)  # a second run's attempt
        try:
            with pytest.raises(BlockingIOError):  # held between the exec and the engine's own hold
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (tmp_path / "probed").touch()
            wait_for("adopted")
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (tmp_path / "release").touch()
            assert run.wait(timeout=60) == 0
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the run ends
        finally:
            os.close(other)
    finally:
        run.kill()


def test_a_stray_descriptor_number_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """A child process inherits the variable, not the descriptor: a number naming another file is ignored."""
    other = tmp_path / "not-the-lock"
    other.write_text("x")
    import os

    fd = os.open(other, os.O_RDONLY)
    try:
        folder = tmp_path / "w"
        monkeypatch.setenv(workspace.INHERITED_ENV, f"{fd}={workspace.lock_path(folder)}")
        with workspace.held(folder):
            held_fd = workspace._held[workspace.lock_path(folder)]
            assert held_fd != fd and os.path.samestat(os.fstat(held_fd), os.stat(workspace.lock_path(folder)))
    finally:
        os.close(fd)


def run_in(work: Path, lock: str, board: str) -> None:
    """What a run leaves in the folder: DVC's lock and the leaderboard (both untracked on main)."""
    (work / "dvc.lock").write_text(lock)
    (work / "data").mkdir(exist_ok=True)
    (work / "data" / "leaderboard.csv").write_text(board)


def test_scheduled_runs_start_where_the_last_run_ended(tmp_path):
    """main tracks neither dvc.lock nor the leaderboard; the last run's results branch does. Each run's
    folder starts from main's code with them carried over, so nothing unchanged reruns, a run that
    changed nothing records nothing, and the leaderboard grows across runs, even in a new folder."""
    from components.pipeline import record_results

    bare, dev = tmp_path / "origin.git", tmp_path / "dev"
    git("init", "--bare", "-q", "-b", "main", str(bare), cwd=tmp_path)
    git("clone", "-q", str(bare), str(dev), cwd=tmp_path)
    (dev / "code.py").write_text("v1\n")
    (dev / ".gitignore").write_text("/data/download\n")
    git("add", "-A", cwd=dev)
    git("commit", "-qm", "code", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    work = tmp_path / "work"

    workspace.checkout(str(bare), "main", str(work))
    run_in(work, "lock of run 1\n", "model,score\nm1,1\n")
    first = record_results(work, "nightly", "run 1", workspace.RESULTS_PREFIX)
    workspace.release(work)
    assert first and first.startswith("easel/runs/nightly/")

    # main moves on (a code change); the next run has main's code and run 1's lock and leaderboard.
    (dev / "code.py").write_text("v2\n")
    git("commit", "-qam", "code v2", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    time.sleep(1.1)  # branches are named by the second
    second = workspace.checkout(str(bare), "main", str(work))
    assert second["results"].endswith(first)
    assert (work / "code.py").read_text() == "v2\n"
    assert (work / "dvc.lock").read_text() == "lock of run 1\n"
    assert record_results(work, "nightly", "run 2", workspace.RESULTS_PREFIX) is None  # nothing changed
    # Its evaluation added a row: recorded, on top of run 1's.
    run_in(work, "lock of run 2\n", "model,score\nm1,1\nm2,2\n")
    recorded = record_results(work, "weekly", "run 2", workspace.RESULTS_PREFIX)
    workspace.release(work)
    assert recorded

    # A cold folder (a new pod) starts from the newest results too.
    cold = tmp_path / "cold"
    workspace.checkout(str(bare), "main", str(cold))
    workspace.release(cold)
    assert (cold / "data" / "leaderboard.csv").read_text() == "model,score\nm1,1\nm2,2\n"
    assert (cold / "dvc.lock").read_text() == "lock of run 2\n" and (cold / "code.py").read_text() == "v2\n"

    # A dvc.lock someone committed on main since: where both changed, main's wins.
    (dev / "dvc.lock").write_text("a lock committed on main\n")
    git("add", "-A", cwd=dev)
    git("commit", "-qm", "lock on main", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    workspace.checkout(str(bare), "main", str(cold))
    workspace.release(cold)
    assert (cold / "dvc.lock").read_text() == "a lock committed on main\n"
    assert (cold / "data" / "leaderboard.csv").read_text() == "model,score\nm1,1\nm2,2\n"


def test_the_pull_step_reads_its_settings_when_the_run_runs(origin, tmp_path, monkeypatch):
    """prefect.yaml's step has no inputs: `prefect deploy` would bake `{{ $VAR }}` placeholders with the
    deploying shell's values, so the worker's (or the pod's) environment is read when the run runs."""
    import yaml

    step = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())["pull"][0]
    assert step == {"flows.workspace.checkout": {"id": "checkout"}}
    bare, _ = origin
    monkeypatch.setenv("EASEL_GIT_REPOSITORY", str(bare))
    monkeypatch.setenv("EASEL_GIT_BRANCH", "main")
    monkeypatch.setenv("EASEL_WORK_DIR", str(tmp_path / "from-the-environment"))
    done = workspace.checkout()
    workspace.release(tmp_path / "from-the-environment")
    assert done["directory"] == str((tmp_path / "from-the-environment").resolve())
    assert (tmp_path / "from-the-environment" / "dvc.lock").read_text() == "v1\n"
