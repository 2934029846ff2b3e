"""`easel demo`: the whole pipeline, offline, on the embedded defaults.

Builds the tiny models, starts (or reuses) the embedded S3 server and the local Prefect server,
serves the bundled sample image site on 127.0.0.1, and runs the Prefect flow, which runs the six
DVC stages and pushes the results to the DVC remote in S3. Ends by printing where everything is,
the run's page in Prefect's UI included (both servers keep running for that).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from components.config import load_params
from components.pipeline import read_metrics
from components.plumbing.errors import EaselError
from components.plumbing.numbers import lookup, number_at, read_json, text_at


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _ui_from_api(api_url: str) -> str:
    """Prefect serves its UI beside its API: http://host:port/api -> http://host:port."""
    return api_url.rstrip("/").removesuffix("/api")


def run_demo(params_path: Path, stages: list[str] | None = None) -> int:
    from components.models.loaders import TINY_ROOT
    from components.models.tiny import build_tiny_models
    from components.prefect_server import local_server
    from components.sample_source import SampleSite, build_site
    from components.storage import EmbeddedS3, configure_dvc_remote, ready_client, require_dvc_project

    started = time.perf_counter()
    project_dir = Path.cwd()
    params = load_params(params_path)
    require_dvc_project(project_dir)  # before anything is built or started
    if params.profile == "tiny":
        _say(f"tiny offline models in {TINY_ROOT}")
        build_tiny_models(TINY_ROOT)
    _say("S3 storage")
    settings, _ = ready_client(params.storage, project_dir, start_embedded=True)
    configure_dvc_remote(project_dir, params.storage, settings)
    if settings.embedded:
        data_dir = EmbeddedS3.from_params(params.storage).data_dir
        print(f"    embedded SeaweedFS at {settings.endpoint_url} (data in {data_dir})")
    else:
        print(f"    endpoint {settings.endpoint_url}")
    site_dir = build_site(Path(params.sample_source.dir) / "site")
    try:
        site = SampleSite(site_dir, params.sample_source.host, params.sample_source.port)
    except OSError as exc:
        raise EaselError(
            f"cannot serve the sample images on {params.sample_source.host}:{params.sample_source.port} "
            f"({exc.strerror}); set sample_source.port (and the URLs in data/sources/) to a free port"
        ) from None
    _say(f"sample image site at {site.base_url}")
    _say("Prefect server")
    api_url = os.environ.get("PREFECT_API_URL")
    with site, local_server(project_dir, params_path) as ui_url:  # None: PREFECT_API_URL names the user's server
        print(f"    UI at {ui_url}" if ui_url else f"    PREFECT_API_URL={api_url}")
        from flows.pipeline import easel_pipeline

        _say("Prefect flow easel-pipeline: download -> validate -> caption -> train -> evaluate -> promote")
        state = easel_pipeline(stages=stages, project_dir=str(project_dir), return_state=True)
        runs = state.result()  # raises the run's error if it failed
    elapsed = time.perf_counter() - started
    _say(f"done in {elapsed:.0f} s")
    for run in runs:
        print(f"    {run.stage:<9} {'ran' if run.ran else 'up to date'}")
    metrics = read_metrics(project_dir)
    where = [
        ("validation report", Path(params.validate_.out_dir) / "report.html"),
        ("caption report", Path(params.caption.out_dir) / "report.html"),
        ("trained model", Path(params.train.out_dir) / "model"),
        ("evaluation report", Path(params.evaluate.out_dir) / "report.html"),
        ("promotion decision", Path(params.promote.out_dir) / "decision.md"),
        ("metrics", Path(params.reporting.metrics_dir)),
    ]
    for label, path in where:
        if path.exists():
            print(f"    {label:<19} {path}")
    decision, _ = read_json(Path(params.promote.out_dir) / "decision.json")
    verdict = text_at(decision, "verdict")
    if verdict:
        print(f"    {'gate verdict':<19} {verdict}")
    registry = lookup(decision, "registry")
    if isinstance(registry, dict) and verdict == "promote":
        print(
            f"    {'registry entry':<19} {registry.get('uri')} ({registry.get('alias')} -> {registry.get('version')})"
        )
    aesthetic, _ = number_at(metrics.get("evaluate"), "aesthetic.mean")
    clip, _ = number_at(metrics.get("evaluate"), "clip_score.mean")
    if aesthetic is not None and clip is not None:
        print(
            f"    aesthetic mean {aesthetic:.4f}, CLIP score mean {clip:.4f} "
            "(tiny random models: the numbers only show the plumbing)"
        )
    ui = ui_url or _ui_from_api(api_url)
    run_page = f"{ui}/runs/flow-run/{state.state_details.flow_run_id}"
    print(f"    {'Prefect run':<19} {run_page} (`easel prefect stop` ends the server)")
    print("    next: `dvc metrics show`, `dvc plots show`, `dvc dag`, `easel registry list`")
    stopped = next((r for r in runs if r.verdict), None)
    return stopped.returncode if stopped else 0
