"""The Easel pipeline with its shards on a Dask cluster (prefect-dask's DaskTaskRunner).

`EASEL_DASK_ADDRESS` (e.g. tcp://scheduler:8786) names an existing cluster; without it the flow
starts a LocalCluster of `EASEL_DASK_WORKERS` worker processes (default: one per CPU). The shard
tasks run on the Dask workers, each in a fresh folder of its own: inputs and results go through
S3 (components.shard_exchange), so the workers need the project's environment and the S3
endpoint, no shared folder. The DVC stages run in the flow's own process. Deployed as
`large-data-refresh-on-dask` (prefect.yaml).
"""

from __future__ import annotations

import os

from prefect_dask import DaskTaskRunner

from flows.pipeline import easel_pipeline

# Dask's nanny caps every worker at one BLAS/OpenMP thread by writing OMP_NUM_THREADS=1 (and MKL, OpenBLAS)
# into the environment of the process that starts the cluster, and leaves it there: the flow's
# later DVC stages (training) would then run on one core. Easel's shard tasks only wait on an
# `easel` process, which should use the threads a single-process run uses: on a CPU, results depend
# on the thread count in their last bits, and a shard must write what the stage would.
THREAD_CAPS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def dask_task_runner(address: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    import dask

    dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": None for name in THREAD_CAPS})
    # No statistical profiler in the workers (Dask's default samples every thread's frames every 10 ms):
    # under CPython 3.11 it deadlocked a worker whose shard was starting threads (S3 transfers); the
    # worker stopped heartbeating for minutes and its shard was run again. A worker of your own
    # cluster: DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False (README, Scaling out).
    dask.config.set({"distributed.worker.profile.enabled": False})
    address = address or os.environ.get("EASEL_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get("EASEL_DASK_WORKERS", 0)) or os.cpu_count() or 1
    # One thread per worker process: each shard task waits on its own `easel` process.
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
    )


easel_pipeline_dask = easel_pipeline.with_options(name="easel-pipeline-dask", task_runner=dask_task_runner())


if __name__ == "__main__":
    easel_pipeline_dask(shards=int(os.environ.get("EASEL_SHARDS", 4)))
