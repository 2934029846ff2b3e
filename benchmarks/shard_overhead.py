"""What sharding costs: each sharded stage run as N shards on a Dask LocalCluster, through the S3
exchange, against the same stage in one process, on the same machine, in one run (issue 24, item 3).

Two copies of one project (tiny profile, the same URL list) run download, validate, caption and
evaluate. Project A runs each stage as `dvc repro --single-item <stage>` (one process). Project B
runs each the way `easel_pipeline(shards=N)` does: hand out the inputs, N shards on the cluster's
workers (each in its own empty folder), hand in the results, then the same DVC stage, which finds
the work done and writes the outputs (Prefect's own task bookkeeping is left out). The training
between caption and evaluate runs once, in A, and B gets A's model.

CPU seconds are the machine's (/proc/stat: user, nice, system, irq, softirq), so they count every
process: the stage's, the shards', Dask's, the image server's and the S3 server's. The S3 server's
own share is also measured (its process's CPU time) and shown apart: on a cluster it runs elsewhere.
The outputs of A and B are checked to be equal.

    .venv/bin/python -m benchmarks.shard_overhead --urls 2000 --shards 2
    .venv/bin/python -m benchmarks.shard_overhead --urls 400 --seeds 64 --stages evaluate   # one stage
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "validate", "caption", "evaluate")


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def make_project(dest: Path, urls_csv: Path, s3, tiny: Path, overrides: dict) -> Path:
    """The tests' project (a copy of the pipeline as its own git + DVC repo), reading one URL list."""
    from tests.conftest import make_project as make_test_project

    source = {"name": "bench", "path": "data/sources/urls.csv", "url_column": "url"}
    project = make_test_project(dest, "http://127.0.0.1", s3, tiny, {"download.sources": [source], **overrides})
    shutil.copy(urls_csv, project / "data" / "sources" / "urls.csv")
    return project


def outputs(project: Path) -> dict[str, str]:
    """What a user reads from the four stages, as text (the project's path taken out)."""
    data = project / "data"
    tables = ["download/manifest.parquet", "validate/accepted.parquet", "caption/captions.parquet"]
    texts = {name: pd.read_parquet(data / name).to_csv(index=False) for name in tables}
    texts["scores"] = (data / "evaluate/scores.csv").read_text()
    return {k: v.replace(str(project), "<project>") for k, v in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the image server adds to a response")
    parser.add_argument("--seeds", type=int, default=4, help="evaluate.seeds: images per prompt and model")
    parser.add_argument("--work", type=Path, default=REPO / ".easel" / "bench" / "shard_overhead")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES),
        help="the stages to measure; the others run in one process in both projects, unmeasured",
    )  # fmt: skip
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    from benchmarks.download.corpus import build_corpus
    from benchmarks.download.run import free_port, wait_for_port
    from components.models.tiny import build_tiny_models
    from components.pipeline import prepare_project, repro_stage, run_stage_shard
    from components.shard_exchange import (
        close_exchange,
        collect_shard_results,
        open_exchange,
        publish_stage_inputs,
    )
    from components.storage import EmbeddedS3
    from flows.on_dask import THREAD_CAPS
    from tests.conftest import free_port_block  # weed mini's seven ports and their gRPC twins

    os.environ.update({"EASEL_NO_PROGRESS": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False"})
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / "corpus"
    build_corpus(corpus, min(args.urls, 2000))
    tiny = build_tiny_models(args.work / "tiny")
    scratch = Path(tempfile.mkdtemp(prefix="shard-overhead-", dir=args.work))

    port = free_port()
    serve = [sys.executable, str(REPO / "benchmarks/download/server.py"), "--dir", str(corpus), "--port", str(port)]
    server = subprocess.Popen([*serve, "--latency", str(args.latency)])
    s3 = EmbeddedS3(data_dir=scratch / "s3", port=free_port_block())
    try:
        wait_for_port(port)
        s3.start()
        settings = s3.settings()
        # Both projects and the cluster's workers reach S3 as a cluster's would: endpoint and keys in the env.
        os.environ.update(
            {
                "EASEL_S3_ENDPOINT": settings.endpoint_url,
                "AWS_ACCESS_KEY_ID": settings.access_key,
                "AWS_SECRET_ACCESS_KEY": settings.secret_key,
                "EASEL_SHARD_DIR": str(scratch / "worker-folders"),
            }
        )
        urls_csv = scratch / "urls.csv"
        pd.DataFrame({"url": [f"http://127.0.0.1:{port}/img/{k}.jpg" for k in range(args.urls)]}).to_csv(
            urls_csv, index=False
        )
        overrides = {
            "evaluate.seeds": list(range(args.seeds)),
            "download.workers": 1,
            # The corpus is photographs cut to 500-1000 px without DPI: let most of them through, so
            # that caption has work (validate decodes and checks every file either way).
            "validate.missing_dpi": "accept",
            "validate.min_short_side": 256,
            "validate.min_long_side": 256,
            "validate.min_kb_per_pixel": 0.0001,
            "validate.min_accepted_share": 0.0,
        }
        single = make_project(scratch / "single", urls_csv, s3, tiny, overrides)
        sharded = make_project(scratch / "sharded", urls_csv, s3, tiny, overrides)
        for project in (single, sharded):
            prepare_project(project)

        dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": None for name in THREAD_CAPS})
        cluster = LocalCluster(n_workers=args.shards, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        exchange = open_exchange(sharded)
        rows = []
        for stage in STAGES:
            if stage == "evaluate":  # one training, in A; B gets the same model
                repro_stage("train", single)
                shutil.copytree(single / "data" / "train", sharded / "data" / "train")
            if stage not in args.stages:
                repro_stage(stage, single)
                repro_stage(stage, sharded)
                continue

            s3_before, cpu_before, wall_before = process_cpu_s(s3.pid()), machine_cpu_s(), time.perf_counter()
            repro_stage(stage, single)
            a = (machine_cpu_s() - cpu_before, process_cpu_s(s3.pid()) - s3_before, time.perf_counter() - wall_before)

            s3_before, cpu_before, wall_before = process_cpu_s(s3.pid()), machine_cpu_s(), time.perf_counter()
            phases = [machine_cpu_s()]  # hand out | shards | hand in | the DVC stage (the merge)
            handed_out = publish_stage_inputs(exchange, stage, sharded, args.shards)
            phases.append(machine_cpu_s())
            futures = client.map(
                run_stage_shard, [stage] * args.shards, range(args.shards), [args.shards] * args.shards,
                [exchange] * args.shards, pure=False,
            )  # fmt: skip
            shards = client.gather(futures)
            phases.append(machine_cpu_s())
            handed_in = collect_shard_results(exchange, stage, args.shards, sharded)
            phases.append(machine_cpu_s())
            repro_stage(stage, sharded)
            phases.append(machine_cpu_s())
            b = (machine_cpu_s() - cpu_before, process_cpu_s(s3.pid()) - s3_before, time.perf_counter() - wall_before)
            rows.append(
                {
                    "stage": stage,
                    "single CPU s": a[0],
                    "sharded CPU s": b[0],
                    "ratio": b[0] / a[0],
                    "S3 server CPU s (single / sharded)": f"{a[1]:.1f} / {b[1]:.1f}",
                    "ratio without the S3 server": (b[0] - b[1]) / (a[0] - a[1]),
                    "wall s (single / sharded)": f"{a[2]:.1f} / {b[2]:.1f}",
                    "sharded CPU s: out / shards / in / merge": " / ".join(
                        f"{later - earlier:.1f}" for earlier, later in itertools.pairwise(phases)
                    ),
                    "files out / in": f"{handed_out} / {handed_in}",
                    "shard summaries": " | ".join(s.summary for s in shards),
                }
            )
            print(rows[-1], flush=True)
        close_exchange(exchange)
        client.close()
        cluster.close()

        expected, got = outputs(single), outputs(sharded)
        different = [name for name in expected if expected[name] != got[name]]
        print(f"outputs equal: {not different}" + (f" (differ: {different})" if different else ""))
        table = pd.DataFrame(rows)
        measured = " ".join(args.stages)
        print(f"\n{args.urls} URLs, {args.shards} shards, evaluate seeds {args.seeds}, measured: {measured}\n")
        print(table.drop(columns=["shard summaries"]).to_markdown(index=False, floatfmt=".2f"))
        print()
        for row in rows:
            print(f"- {row['stage']}: {row['shard summaries']}")
    finally:
        server.terminate()
        server.wait()
        s3.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
