"""Fan the download out over workers: one Prefect task per shard, then the DVC stage.

Each task runs `easel download --shard K/N --no-manifest` in the project folder, fetching only
the URLs whose stable hash falls in its shard into the shared image store and journal. Then the
DVC `download` stage runs as usual: it finds every URL journaled, fetches nothing, and writes
the manifest and metrics. On one machine the tasks run as concurrent processes; for a cluster,
run the flow with a distributed task runner whose workers share the project folder (e.g. NFS):

    from prefect_dask import DaskTaskRunner      # pip install prefect-dask
    download_sharded.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))(shards=64)
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from components.pipeline import fetch_download_shard, repro_stage


@task(name="download-shard", retries=2, retry_delay_seconds=10)
def download_shard(shard: int, shards: int, project_dir: str) -> str:
    return fetch_download_shard(shard, shards, project_dir)


@task(name="dvc-stage-download")
def download_stage(project_dir: str) -> bool:
    return repro_stage("download", project_dir).ran


@flow(name="easel-download-sharded", log_prints=True)
def download_sharded(shards: int = 4, project_dir: str = ".") -> list[str]:
    project_dir = str(Path(project_dir).resolve())
    futures = download_shard.map(list(range(shards)), shards, project_dir)
    lines = futures.result()  # waits for every shard; a failed shard fails the flow
    for line in lines:
        print(line)
    download_stage(project_dir)
    return lines


if __name__ == "__main__":
    download_sharded()
