"""Scratch folders and temp files that a killed run does not leave behind.

A stage's scratch (download's URL index, caption's cache index, validate's chunks, a shard's
inputs, promote's single-file export) can hold gigabytes. `tempfile.TemporaryDirectory` removes
it when the run ends, but not when the run is killed (an OOM kill, a preempted worker, kill -9),
and on a long-lived machine those leftovers fill the disk.

So each scratch folder has a lock file beside it (`.<folder>.lock`) that its process holds an
exclusive `flock` on for as long as the folder is in use. The kernel drops the lock when the
process dies, however it dies. Making a new scratch folder first removes every folder of the same
root whose lock nobody holds: the leftovers of runs that died. A folder whose owner is alive is
never touched, on this machine or (where the file system shares locks) another one.

Temp files beside their targets (`fsutil.temp_beside`: an output being written, an image being
stored) carry their writer's pid and host in their name instead: `remove_abandoned_temps` removes
those whose process on this host no longer runs, and those of another host untouched for an hour.
A stage whose output folder DVC keeps between runs (download's, caption's) sweeps it as it starts,
so a killed run's half-written manifest is neither kept nor pushed with the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

from components.plumbing.procs import pid_alive

PREFIX = "easel-"  # every scratch folder's name starts with this; the sweep looks at no other name
LOCK_SUFFIX = ".lock"
STALE_TEMP_S = 3600  # a temp file of another host untouched this long is abandoned
# `.<name>.<pid>@<host>.<random>.tmp` (fsutil.temp_beside) or `.<pid>@<host>.<random>.part` (the image store)
TEMP_NAME = re.compile(r"^\.(?:.*\.)?(\d+)@([^@/]+)\.[^.]+\.(?:tmp|part)$")


class ScratchDir:
    """A fresh folder `<root>/easel-<kind>-XXXXXXXX`, removed by `cleanup()` (or on leaving a `with`
    block), and by the next ScratchDir made in `root` should this process be killed first. `root` is
    the system temp folder (TMPDIR) unless given."""

    def __init__(self, kind: str, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir())
        self.root.mkdir(parents=True, exist_ok=True)
        remove_abandoned_scratch(self.root)
        # The lock is taken under a temp name and renamed next to the folder only once held, so a
        # sweep in another process never finds a lock file that is free only because it is new.
        fd, held = tempfile.mkstemp(dir=self.root, prefix=f".{PREFIX}new-", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
            self.path = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{PREFIX}{kind}-"))
            self._lock = _lock_path(self.path)
            os.replace(held, self._lock)
        except BaseException:
            os.close(fd)
            Path(held).unlink(missing_ok=True)
            raise
        self._fd: int | None = fd

    @property
    def name(self) -> str:
        return str(self.path)

    def cleanup(self) -> None:
        if self._fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _lock_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


def remove_abandoned_scratch(root: Path | str) -> int:
    """Remove the scratch folders in `root` whose lock no process holds; returns how many.

    Only this user's own lock files and real folders are touched: a symlink, or a folder or lock
    of another user (a shared /tmp), is passed over."""
    root = Path(root)
    removed = 0
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    uid = os.getuid()
    for entry in entries:
        name = entry.name
        if not (name.startswith(f".{PREFIX}") and name.endswith(LOCK_SUFFIX)):
            continue
        folder = root / name[1 : -len(LOCK_SUFFIX)]
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, a symlink, or not ours to read
        try:
            if os.fstat(fd).st_uid != uid:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(folder)
                if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
                    shutil.rmtree(folder, ignore_errors=True)
            # Unlinked while still held: another sweep that opened it meanwhile finds it locked.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed += 1
        finally:
            os.close(fd)
    return removed


def abandoned_temp(path: Path) -> bool:
    """Whether `path`, a temp file named with its writer (fsutil.writer_tag), was left by a writer
    that is gone: a process of this host that no longer runs, or one of another host that has not
    touched it for STALE_TEMP_S. Any other name: False."""
    match = TEMP_NAME.match(path.name)
    if match is None:
        return False
    pid, host = int(match[1]), match[2]
    if host == socket.gethostname():
        return not pid_alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > STALE_TEMP_S
    except FileNotFoundError:
        return False


def remove_abandoned_temps(folder: Path | str, depth: int = 2) -> int:
    """Remove the abandoned temp files (and atomic_dir's temp folders) in `folder` and the folders
    below it down to `depth` levels; returns how many. Symlinks are not followed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        is_dir = entry.is_dir(follow_symlinks=False)
        if entry.name.startswith(".") and abandoned_temp(Path(entry.path)):
            if is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed += 1
        elif is_dir and depth > 1:
            removed += remove_abandoned_temps(entry.path, depth - 1)
    return removed
