"""A fresh setup's install of the lock, uv copying the packages from its cache against hard-linking
them: wall time and disk used (venv and cache together, a hard-linked file counted once).

Each mode gets a new venv and an empty uv cache on one filesystem, as `.ci/run` and a newcomer's
first `bash infra/easel.sh demo` have; the modes alternate, `--rounds` times.

    .venv/bin/python -m benchmarks.setup_link_mode [--rounds 2] [--root /tmp]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def disk_used(*folders: Path) -> int:
    """Bytes allocated under the folders, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in folders:
        for parent, dirs, files in os.walk(folder):
            for name in dirs + files:
                info = os.lstat(os.path.join(parent, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


def install(mode: str, root: Path, uv: str) -> tuple[float, int]:
    work = Path(tempfile.mkdtemp(prefix=f"link-{mode}-", dir=root))
    try:
        venv, cache = work / "venv", work / "uv-cache"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        env = os.environ | {"UV_LINK_MODE": mode, "UV_CACHE_DIR": str(cache)}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(REPO / "infra/uv_install.py"), str(venv / "bin/python"), uv,
             str(REPO / "infra/requirements.lock")],
            env=env, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        return seconds, disk_used(venv, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    uv = shutil.which("uv", path=str(REPO / ".venv/bin")) or sys.exit("no uv in .venv/bin: pip install uv")
    print(f"{platform.platform()}, {os.cpu_count()} cores, {subprocess.check_output([uv, '--version'], text=True)}")
    results: dict[str, list[tuple[float, int]]] = {"copy": [], "hardlink": []}
    for _ in range(args.rounds):
        for mode in results:
            results[mode].append(install(mode, args.root, uv))
            seconds, used = results[mode][-1]
            print(f"{mode:9s} {seconds:6.1f} s  {used / 1e9:5.2f} GB", flush=True)
    copy, link = (statistics.median(s for s, _ in results[m]) for m in ("copy", "hardlink"))
    print(f"median: copy {copy:.1f} s, hardlink {link:.1f} s, ratio copy/hardlink {copy / link:.2f}")


if __name__ == "__main__":
    main()
