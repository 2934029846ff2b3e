"""Background helper processes (the embedded S3 server, the local Prefect server, the sample image
site): start once, find again by pid file, stop cleanly; commands run with a deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from components.plumbing.fsutil import atomic_write_bytes


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


@dataclass
class LoopbackService:
    """A background server of Easel's own, bound to a loopback port, its state in `data_dir`: it is
    started once, found again by its pid and port files, and told apart from another program on its
    port. Subclasses name their files and errors, say how to start the program and how it answers."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"

    # What a subclass sets: the files' stem, what the service is called, its params key and command.
    file_stem: ClassVar[str] = "server"
    title: ClassVar[str] = "the server"
    port_key: ClassVar[str] = "its port"
    command: ClassVar[str] = "easel"
    error: ClassVar[type[Exception]] = RuntimeError

    @classmethod
    def in_project(cls, data_dir: str, port: int, root: Path | None = None, **more) -> Self:
        """The service whose folder params name, relative to the project root (default: the current folder)."""
        folder = Path(data_dir)
        if not folder.is_absolute():
            folder = (root or Path.cwd()) / folder
        return cls(data_dir=folder, port=port, **more)

    @property
    def pid_file(self) -> Path:
        return self.data_dir / f"{self.file_stem}.pid"

    @property
    def port_file(self) -> Path:
        return self.data_dir / f"{self.file_stem}.port"

    @property
    def log_file(self) -> Path:
        return self.data_dir / f"{self.file_stem}.log"

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def running_port(self) -> int | None:
        """The port of this data folder's running server (None when none runs)."""
        if self.pid() is None:
            return None
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def answers(self) -> bool:
        """The program on the port answers as this service does (subclasses may ask it something)."""
        return port_open(self.port, self.host)

    def ready(self) -> bool:
        """What a start waits for: by default, that it answers."""
        return self.answers()

    def is_running(self) -> bool:
        """This data folder's server runs on this port and answers (a port held by another program is not ours)."""
        return self.running_port() == self.port and self.answers()

    def claim_port(self) -> None:
        """Before a start: refuse a server of this folder on another port, or a port another program holds."""
        elsewhere = self.running_port()
        if self.pid() is not None and elsewhere != self.port:
            raise self.error(
                f"{self.title} of {self.data_dir} runs on port {elsewhere or 'unknown'} (pid {self.pid()}), "
                f"not on {self.port_key} {self.port}; run `{self.command} stop`, then `{self.command} start`"
            )
        if self.pid() is not None:  # ours, on this port, but not answering: a hung server
            self.stop()
        if port_open(self.port, self.host):
            raise self.error(
                f"port {self.port} on {self.host} is taken by another program; set {self.port_key} "
                f"in params.yaml to a free port{self.elsewhere_hint()}"
            )

    def elsewhere_hint(self) -> str:
        """How to use a server of this kind that someone else runs instead."""
        return ""

    def launch(self, args: list[str], env: dict, timeout_s: float) -> None:
        """Spawn the program, record it, and wait until it answers (stopped again if it never does)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        proc = spawn(args, self.pid_file, self.log_file, env, self.data_dir)
        atomic_write_bytes(self.port_file, str(self.port).encode())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise self.error(f"{self.title} exited with code {proc.returncode}; see {self.log_file}")
            if port_open(self.port, self.host) and self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise self.error(f"{self.title} did not come up in {timeout_s:.0f} s; see {self.log_file}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop this data folder's server if it runs. Returns True if one was stopped."""
        return stop(self.pid_file, timeout_s)
