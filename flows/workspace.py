"""The work folder of scheduled runs: fetch the code to run, and let one run at a time use it.

`checkout` is a Prefect pull step (prefect.yaml): before a deployment's flow starts, the worker
clones the repository at the configured branch into the work folder, or brings an earlier
clone to the branch's newest commit (tracked files reset; ignored files such as DVC outputs,
caches and downloads kept, so DVC reuses what is still valid and downloads resume).

A run holds the work folder's lock from its pull step to its end, so two runs never run git or
DVC in the same folder at once: a second run waits in its pull step until the first has ended.
The lock survives Prefect's exec of the flow engine after the pull step (an inherited descriptor).
The flow takes the same lock when it runs without a pull step (`easel demo`, a flow called
from Python), and it is re-entrant within a process.

This module uses only the standard library and imports nothing from `components`: it runs in
the worker before the fetched code, which must be the code the flow and its stages then import.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("easel.workspace")

_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of this process (a run)

# The descriptor of a held lock, named for the program this process may exec next. Prefect's
# workspace supervisor runs the pull step, then execs the flow's engine: the lock's descriptor is
# inherited across that exec (so the folder is never free in between), and the engine's `hold`
# adopts it from here instead of waiting for a lock its own process image already holds.
INHERITED_ENV = "EASEL_WORKSPACE_LOCK_FDS"


def lock_path(work_dir: Path | str) -> Path:
    """The lock beside the folder (not inside: a fresh clone must not find its folder taken)."""
    work_dir = Path(work_dir).resolve()
    return work_dir.with_name(f".{work_dir.name}.lock")


def _inherited(path: Path) -> int | None:
    """The descriptor of `path`'s lock this process image inherited, if it is really that file."""
    for entry in filter(None, os.environ.get(INHERITED_ENV, "").split(os.pathsep)):
        fd_text, _, named = entry.partition("=")
        if named != str(path) or not fd_text.isdigit():
            continue
        fd = int(fd_text)
        try:  # the same file, not whatever a child process has under that number
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            return None
        return fd if same else None
    return None


def _advertise() -> None:
    os.environ[INHERITED_ENV] = os.pathsep.join(f"{fd}={path}" for path, fd in _held.items())


def hold(work_dir: Path | str, poll_s: float = 2.0, report_every_s: float = 60.0) -> Path:
    """Take the folder's lock for the rest of this process's life (wait while another run has it).

    The lock survives an exec of this process (its descriptor is inheritable), as the pull step's
    lock must survive Prefect's exec of the flow engine.
    """
    path = lock_path(work_dir)
    if path in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _inherited(path)
    if fd is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    # flock on the descriptor that already holds the lock (an inherited one) succeeds at once.
    waited, last_report = 0.0, -report_every_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if waited - last_report >= report_every_s:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
                log.info("waiting for %s to finish with %s (%.0f s so far)", holder, Path(work_dir), waited)
                last_report = waited
            time.sleep(poll_s)
            waited += poll_s
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv[:2])})".encode(), 0)
    os.set_inheritable(fd, True)
    _held[path] = fd
    _advertise()
    return path


def release(work_dir: Path | str) -> None:
    fd = _held.pop(lock_path(work_dir), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        _advertise()


@contextlib.contextmanager
def held(work_dir: Path | str) -> Iterator[None]:
    """The lock for the duration of a block; a lock this process already holds stays held after it."""
    already = lock_path(work_dir) in _held
    hold(work_dir)
    try:
        yield
    finally:
        if not already:
            release(work_dir)


def _git(args: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"git {' '.join(args)} failed (exit {proc.returncode}): {detail[0]}")
    return proc.stdout.strip()


# Scheduled runs record what they changed that git tracks (dvc.lock, metrics, the leaderboard, the
# decision) as branches under this prefix (components.pipeline.record_results is given it).
RESULTS_PREFIX = "easel/runs"
IDENTITY = ["-c", "user.name=Easel scheduled run", "-c", "user.email=easel@localhost"]


def newest_results(work_dir: Path) -> str | None:
    """The newest results branch on origin (any deployment's), as fetched: what the last run left."""
    refs = _git(
        [
            "for-each-ref",
            "--sort=-committerdate",
            "--count=1",
            "--format=%(refname)",
            f"refs/remotes/origin/{RESULTS_PREFIX}/",
        ],
        work_dir,
    )
    return refs or None


def carry_results(work_dir: Path, branch: str) -> str | None:
    """Merge the newest results branch into the freshly checked-out branch, in this folder only.

    The branch (main) does not track dvc.lock or the leaderboard; the last run's results branch
    does. Merged, the folder starts where the last run ended: DVC finds its outputs up to date and
    reruns nothing, the leaderboard grows, and a run that changed nothing records nothing. Where the
    branch changed the same lines (a dvc.lock a person committed), the branch's version wins; a
    merge git cannot make is abandoned and the run starts from the branch alone (DVC then reruns
    what it cannot verify).
    """
    results = newest_results(work_dir)
    if results is None:
        return None
    configured = subprocess.run(["git", "config", "user.email"], cwd=work_dir, capture_output=True).stdout
    identity = [] if configured else IDENTITY
    message = f"easel: carry {results.removeprefix('refs/remotes/origin/')} onto {branch} for this run"
    try:
        _git([*identity, "merge", "--no-edit", "-X", "ours", "-m", message, results], work_dir)
    except RuntimeError as exc:
        subprocess.run(["git", "merge", "--abort"], cwd=work_dir, capture_output=True)
        _git(["checkout", "--force", "-B", branch, f"origin/{branch}"], work_dir)
        log.warning("could not carry %s onto %s (%s); starting from %s alone", results, branch, exc, branch)
        return None
    return results


def checkout(repository: str = "", branch: str = "", directory: str = "") -> dict[str, str]:
    """Clone `repository` at `branch` into `directory`, or update the clone there, and carry the last
    run's results onto it; returns {"directory", "commit", "results"}.

    Arguments left empty come from the run's environment when it runs: EASEL_GIT_REPOSITORY,
    EASEL_GIT_BRANCH (default `main`), EASEL_WORK_DIR (default `easel-work` under the worker's
    current folder).
    """
    repository = repository or os.environ.get("EASEL_GIT_REPOSITORY", "")
    if not repository:
        raise ValueError(
            "checkout: no repository; set EASEL_GIT_REPOSITORY on the worker (a URL or a path), or on Kubernetes "
            "in the ConfigMap easel-settings (infra/k8s/worker.yaml)"
        )
    branch = branch or os.environ.get("EASEL_GIT_BRANCH") or "main"
    work_dir = Path(directory or os.environ.get("EASEL_WORK_DIR") or "easel-work").resolve()
    hold(work_dir)  # held until the run ends: no other run may reset this folder under it
    if not (work_dir / ".git").is_dir():
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        log.info("cloning %s (branch %s) into %s", repository, branch, work_dir)
        _git(["clone", "--branch", branch, "--", repository, str(work_dir)])
    else:
        origin = _git(["remote", "get-url", "origin"], work_dir)
        if origin != repository:
            raise ValueError(f"checkout: {work_dir} is a clone of {origin}, not of {repository}; use another folder")
    _git(
        [
            "fetch", "--prune", "origin",
            f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
            f"+refs/heads/{RESULTS_PREFIX}/*:refs/remotes/origin/{RESULTS_PREFIX}/*",
        ],
        work_dir,
    )  # fmt: skip
    # Tracked files as the branch has them; ignored files (DVC outputs, caches, downloads) stay for DVC to reuse.
    _git(["checkout", "--force", "-B", branch, f"origin/{branch}"], work_dir)
    results = carry_results(work_dir, branch)
    commit = _git(["rev-parse", "HEAD"], work_dir)
    log.info("%s at %s (%s)%s", work_dir, branch, commit[:12], f", with the results of {results}" if results else "")
    # The fetched code is what runs: the flow (loaded from this folder) and its stages import it.
    sys.path.insert(0, str(work_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(work_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {"directory": str(work_dir), "commit": commit, "results": results or ""}
