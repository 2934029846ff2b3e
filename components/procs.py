"""Background helper processes (the embedded S3 server, the sample image site): start once,
find again by pid file, stop cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from components.fsutil import atomic_write_bytes


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            return False
    return True


def read_pid(pid_file: Path) -> int | None:
    """The pid in pid_file if that process still runs."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def spawn(args: list[str], pid_file: Path, log_file: Path, env: dict | None = None, cwd: Path | None = None):
    """Start a detached process (its own session, so it outlives us) and record its pid."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    atomic_write_bytes(pid_file, str(proc.pid).encode())
    return proc


def stop(pid_file: Path, timeout_s: float = 20.0) -> bool:
    """Stop the process group recorded in pid_file; True if one was running."""
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


class CommandTimedOut(TimeoutError):
    """A command ran past its deadline; it and every process it started were killed."""


def run_captured(
    args: list[str], cwd: Path | str | None = None, env: dict | None = None, timeout_s: float | None = None
) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True), with the command in a process group of its own
    that is killed whole on timeout or on any exception here (an interrupt, a cancelled run): a DVC
    stage's own children (`easel train`) do not outlive it."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CommandTimedOut(f"`{' '.join(args[:4])}` ran past {timeout_s:.0f} s and was stopped") from None
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
