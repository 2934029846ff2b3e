"""Download throughput, side by side in one run: the guide's loop, img2dataset 1.47, Easel.

A latency server (its own process) on 127.0.0.1 serves N real-size images with an added delay
per request. Each downloader runs as a child process on the same machine; we record its wall
time, its CPU seconds (user + system, children included) and what it saved.

    .venv/bin/python -m benchmarks.download.run --n 2000 --latency 0.05
    .venv/bin/python -m benchmarks.download.run --n 20000 --only easel      # cost growth

img2dataset runs from its own venv (.easel/bench/img2dataset-venv), created on first use:
    python3.11 -m venv .easel/bench/img2dataset-venv
    .easel/bench/img2dataset-venv/bin/pip install img2dataset==1.47.0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.download.corpus import build_corpus

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BENCH = REPO / ".easel" / "bench"
I2D_PYTHON = BENCH / "img2dataset-venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server on {port} did not start")


def start_image_server(corpus: Path, latency: float) -> tuple[subprocess.Popen, int]:
    """The latency image server (server.py) on a free loopback port, in its own process, ready."""
    port = free_port()
    command = [sys.executable, str(HERE / "server.py"), "--dir", str(corpus), "--port", str(port)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # aiohttp logs every request
    server = subprocess.Popen([*command, "--latency", str(latency)], **quiet)
    try:
        wait_for_port(port)
    except BaseException:
        server.terminate()
        raise
    return server, port


def timed(args: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run a child to completion; wall seconds and CPU seconds of it and its own children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stdout": proc.stdout[-500:]}


def count_images(folder: Path, suffixes=(".jpg", ".png")) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix in suffixes and not p.name.startswith("."))


def run_guide(urls: list[str], work: Path) -> dict:
    csv_path = work / "guide.csv"
    csv_path.write_text("poster_path\n" + "\n".join(urls) + "\n")
    out = work / "guide-out"
    result = timed([sys.executable, str(HERE / "guide_loop.py"), str(csv_path), str(out)], work)
    return result | {"saved": count_images(out)}


def run_img2dataset(urls: list[str], work: Path, processes: int, threads: int) -> dict:
    if not I2D_PYTHON.exists():
        raise RuntimeError(f"img2dataset venv missing: see this script's docstring ({I2D_PYTHON})")
    txt = work / "i2d.txt"
    txt.write_text("\n".join(urls) + "\n")
    out = work / "i2d-out"
    args = [str(I2D_PYTHON), str(HERE / "img2dataset_run.py"), str(txt), str(out), str(processes), str(threads)]
    result = timed(args, work)
    return result | {"saved": count_images(out)}


def run_easel(urls: list[str], work: Path, concurrency: int, workers: int) -> dict:
    project = work / "easel"
    project.mkdir()
    (project / "urls.csv").write_text("url\n" + "\n".join(urls) + "\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"].update(
        sources=[{"name": "bench", "path": "urls.csv"}],
        out_dir="out",
        concurrency=concurrency,
        per_host_concurrency=concurrency,
        workers=workers,
        allow_networks=["127.0.0.0/8"],
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "EASEL_NO_PROGRESS": "1"}
    easel = str(Path(sys.executable).parent / "easel")
    result = timed([easel, "download"], project, env)
    manifest = json.loads((project / "data/metrics/download.json").read_text())
    return result | {"saved": count_images(project / "out" / "images"), "outcomes": manifest["outcomes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="number of URLs")
    parser.add_argument("--files", type=int, default=2000, help="distinct corpus files (URLs cycle over them)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every response")
    parser.add_argument("--only", nargs="*", default=["guide", "img2dataset", "easel"])
    parser.add_argument("--guide-n", type=int, default=400, help="URLs for the sequential loop (it is slow)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--i2d-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--i2d-threads", type=int, default=64)
    parser.add_argument(
        "--work-dir",
        default="/dev/shm/easel-bench" if Path("/dev/shm").is_dir() else str(BENCH / "work"),
        help="where downloads land (tmpfs by default: disk writeback noise stays out of the comparison)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--out", default=str(BENCH / "download-results.json"))
    args = parser.parse_args()

    corpus = BENCH / "corpus"
    build_corpus(corpus, args.files)
    sizes = [p.stat().st_size for p in corpus.iterdir() if p.suffix in (".jpg", ".png")]
    server, port = start_image_server(corpus, args.latency)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "n": args.n,
        "latency_s": args.latency,
        "corpus_kb": {"min": min(sizes) // 1024, "mean": sum(sizes) // len(sizes) // 1024, "max": max(sizes) // 1024},
        "runs": {},
    }
    try:
        files = sorted(p for p in corpus.iterdir() if p.suffix in (".jpg", ".png"))
        urls = [f"http://127.0.0.1:{port}/img/{k}{files[k % len(files)].suffix}" for k in range(args.n)]
        # Rounds interleave the contenders, so slow spells of a shared machine hit them alike;
        # the median round of each is reported.
        for round_index in range(args.rounds):
            for name in args.only:
                work = Path(args.work_dir) / f"run-{name}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                if name == "guide":
                    subset = urls[: args.guide_n]
                    res = run_guide(subset, work) | {"n": len(subset)}
                elif name == "img2dataset":
                    res = run_img2dataset(urls, work, args.i2d_processes, args.i2d_threads) | {"n": len(urls)}
                else:
                    res = run_easel(urls, work, args.concurrency, args.workers) | {"n": len(urls)}
                res["images_per_s"] = res["saved"] / res["wall_s"]
                res["cpu_ms_per_image"] = 1000 * res["cpu_s"] / max(res["saved"], 1)
                results["runs"].setdefault(name, []).append(res)
                print(
                    f"round {round_index + 1}  {name:<12} n={res['n']:<6} saved={res['saved']:<6} "
                    f"wall={res['wall_s']:7.1f}s {res['images_per_s']:7.1f} img/s  "
                    f"CPU {res['cpu_s']:6.1f}s = {res['cpu_ms_per_image']:.2f} ms/img",
                    flush=True,
                )
                shutil.rmtree(work, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
    results["median"] = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("images_per_s", "cpu_ms_per_image", "wall_s")}
        for name, runs in results["runs"].items()
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    med = results["median"]
    for name, m in med.items():
        print(f"median {name:<12} {m['images_per_s']:7.1f} img/s  {m['cpu_ms_per_image']:.2f} ms CPU/img")
    if "easel" in med:
        for other in ("guide", "img2dataset"):
            if other in med:
                print(
                    f"easel / {other}: {med['easel']['images_per_s'] / med[other]['images_per_s']:.2f}x images/s, "
                    f"{med['easel']['cpu_ms_per_image'] / med[other]['cpu_ms_per_image']:.2f}x CPU per image"
                )


if __name__ == "__main__":
    main()
