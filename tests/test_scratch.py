"""Scratch folders (components/plumbing/scratch.py): a killed run's folder is removed by the next run, a live
run's never, and the sweep touches nothing but its own lock files and real folders."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from components.plumbing.fsutil import writer_tag
from components.plumbing.scratch import ScratchDir, remove_abandoned_scratch, remove_abandoned_temps

HOLD_SCRATCH = (
    "import sys, time\n"
    "from components.plumbing.scratch import ScratchDir\n"
    "scratch = ScratchDir(sys.argv[2], sys.argv[1])\n"
    "(scratch.path / 'index.sqlite').write_bytes(b'x' * 4096)\n"
    "print(scratch.path, flush=True)\n"
    "time.sleep(120)\n"
)


def holding_scratch(root, kind):
    """A process that made a scratch folder in `root` and is still using it; and that folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRATCH, str(root), kind], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    return proc, proc.stdout.readline().strip()


def test_a_killed_run_s_scratch_goes_with_the_next_run_and_a_live_run_s_stays(tmp_path):
    root = tmp_path / "tmp"
    killed, killed_folder = holding_scratch(root, "download")
    alive, alive_folder = holding_scratch(root, "caption")
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert (root / os.path.basename(killed_folder) / "index.sqlite").is_file()  # kill -9 cleans nothing up

        with ScratchDir("validate", root) as mine:
            assert mine.is_dir() and mine.name.startswith("easel-validate-")
            assert not os.path.exists(killed_folder)
            assert os.path.isfile(os.path.join(alive_folder, "index.sqlite"))  # its owner still uses it
        assert not mine.exists()
    finally:
        alive.kill()
        alive.wait()
    assert remove_abandoned_scratch(root) == 1
    assert sorted(os.listdir(root)) == []


def test_the_sweep_follows_no_symlink_and_leaves_other_files(tmp_path):
    root, precious = tmp_path / "tmp", tmp_path / "precious"
    root.mkdir()
    precious.mkdir()
    (precious / "keep.txt").write_text("the user's")
    (root / ".easel-a.lock").write_text("")  # an abandoned lock whose "folder" is a symlink
    (root / "easel-a").symlink_to(precious)
    (root / ".easel-b.lock").symlink_to(precious / "keep.txt")  # a lock file that is a symlink
    (root / "easel-c").mkdir()  # a folder with no lock: not a scratch folder of this module
    (root / ".other.lock").write_text("")

    assert remove_abandoned_scratch(root) == 1
    assert (precious / "keep.txt").read_text() == "the user's"
    assert sorted(os.listdir(root)) == [".easel-b.lock", ".other.lock", "easel-a", "easel-c"]


def test_a_scratch_folder_is_removed_when_its_run_fails(tmp_path):
    root = tmp_path / "tmp"
    try:
        with ScratchDir("export", root) as scratch:
            (scratch / "model.safetensors").write_bytes(b"\0" * 1024)
            raise RuntimeError("the upload failed")
    except RuntimeError:
        pass
    assert os.listdir(root) == []


def test_abandoned_temps_go_and_the_rest_stays(tmp_path):
    """remove_abandoned_temps: a dead writer's temp file and atomic_dir folder go, at any depth it
    is asked to look; a live writer's, a link's target, and files not named as temps stay."""
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("the user's")
    out = tmp_path / "out"
    (out / "sub" / "deeper").mkdir(parents=True)
    gone = [
        out / f".manifest.parquet.{dead.pid}@{host}.abcd1234.tmp",
        out / "sub" / f".report.html.{dead.pid}@{host}.efgh5678.tmp",
    ]
    for path in gone:
        path.write_text("half")
    (out / f".validate.{dead.pid}@{host}.ijkl9012.tmp").mkdir()  # atomic_dir's folder
    gone.append(out / f".validate.{dead.pid}@{host}.ijkl9012.tmp")
    (out / f".link.{dead.pid}@{host}.mnop3456.tmp").symlink_to(precious)  # the link goes, not its target
    gone.append(out / f".link.{dead.pid}@{host}.mnop3456.tmp")
    stays = [
        out / f".manifest.parquet.{writer_tag()}.qrst7890.tmp",
        out / "sub" / "deeper" / f".x.{dead.pid}@{host}.uvwx1234.tmp",  # below the depth asked for
        out / ".manifest.parquet.tmp",
        out / "notes.tmp",
    ]
    for path in stays:
        path.write_text("keep")

    assert remove_abandoned_temps(out, depth=2) == 4
    assert [p for p in gone if os.path.lexists(p)] == []
    assert [p for p in stays if not p.exists()] == []
    assert (precious / "keep.txt").read_text() == "the user's"


def test_a_folder_written_whole_first_removes_what_a_killed_writing_of_it_left(tmp_path):
    """fsutil.atomic_dir: a killed run's temp folder and moved-aside old folder beside the output
    (a whole model, for a save killed midway) go when the output is next written; a live writer's stay."""
    from components.plumbing.fsutil import atomic_dir

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [tmp_path / f".model.{dead.pid}@{host}.abcd1234.tmp", tmp_path / f".model.{dead.pid}@{host}.old.tmp"]
    live = tmp_path / f".model.{writer_tag()}.efgh5678.tmp"
    for folder in [*left, live]:
        folder.mkdir()
        (folder / "unet.safetensors").write_bytes(b"\0" * 64)
    with atomic_dir(tmp_path / "model") as out:
        (out / "unet.safetensors").write_bytes(b"new")
    assert (tmp_path / "model" / "unet.safetensors").read_bytes() == b"new"
    assert [p for p in left if p.exists()] == [] and live.is_dir()
    with atomic_dir(tmp_path / "model") as out:  # replacing it leaves nothing beside it
        (out / "unet.safetensors").write_bytes(b"newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])
