"""The work folder of scheduled runs: fetch the code to run, and let one run at a time use it.

`checkout` is a Prefect pull step (prefect.yaml): before a deployment's flow starts, the worker
clones the repository at the configured branch into the work folder, or brings an earlier
clone to the branch's newest commit (tracked files reset; ignored files such as DVC outputs,
caches and downloads kept, so DVC reuses what is still valid and downloads resume).

A run holds the work folder's lock from its pull step to its end, so two runs never run git or
DVC in the same folder at once: a second run waits in its pull step until the first has ended.
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


def lock_path(work_dir: Path | str) -> Path:
    """The lock beside the folder (not inside: a fresh clone must not find its folder taken)."""
    work_dir = Path(work_dir).resolve()
    return work_dir.with_name(f".{work_dir.name}.lock")


def hold(work_dir: Path | str, poll_s: float = 2.0, report_every_s: float = 60.0) -> Path:
    """Take the folder's lock for the rest of this process's life (wait while another run has it)."""
    path = lock_path(work_dir)
    if path in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
    _held[path] = fd
    return path


def release(work_dir: Path | str) -> None:
    fd = _held.pop(lock_path(work_dir), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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


def checkout(repository: str, branch: str = "", directory: str = "") -> dict[str, str]:
    """Clone `repository` at `branch` into `directory`, or update the clone there; returns {"directory"}.

    Empty arguments (unset environment variables in prefect.yaml) take the defaults: branch
    `main`, directory `easel-work` under the worker's current folder.
    """
    if not repository:
        raise ValueError("checkout: no repository; set EASEL_GIT_REPOSITORY on the worker (a URL or a path)")
    branch = branch or "main"
    work_dir = Path(directory or "easel-work").resolve()
    hold(work_dir)  # held until the run ends: no other run may reset this folder under it
    if not (work_dir / ".git").is_dir():
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        log.info("cloning %s (branch %s) into %s", repository, branch, work_dir)
        _git(["clone", "--branch", branch, "--", repository, str(work_dir)])
    else:
        origin = _git(["remote", "get-url", "origin"], work_dir)
        if origin != repository:
            raise ValueError(f"checkout: {work_dir} is a clone of {origin}, not of {repository}; use another folder")
        _git(["fetch", "--prune", "origin", branch], work_dir)
        # Tracked files as the branch has them (a run's dvc.lock and metrics were pushed as its own ref);
        # ignored files (DVC outputs, caches, downloads) stay for DVC to reuse.
        _git(["checkout", "--force", "-B", branch, f"origin/{branch}"], work_dir)
    commit = _git(["rev-parse", "HEAD"], work_dir)
    log.info("%s at %s (%s)", work_dir, branch, commit[:12])
    # The fetched code is what runs: the flow (loaded from this folder) and its stages import it.
    sys.path.insert(0, str(work_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(work_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {"directory": str(work_dir), "commit": commit}
