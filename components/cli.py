"""`easel`: one subcommand per pipeline stage, plus storage, models, registry and the demo.

Every stage reads params.yaml (`--params`), works relative to the project root (the current
directory, as under `dvc repro`), and exits non-zero with one clear message on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from components.config import STAGES
from components.plumbing.errors import EaselError, GateRejected

NOT_CURRENT_EXIT = 3  # `easel registry is-current`: the model is not the one the alias points at

log = logging.getLogger("easel")


def _quiet_libraries() -> None:
    """Keep library chatter (weights-loading bars, telemetry) out of stage logs."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*upcast_vae.*")


def _load(args):
    from components.config import load_params

    return load_params(args.params)


def _progress(args) -> bool:
    """Progress bars unless --no-progress or EASEL_NO_PROGRESS=1 (set by the Prefect flow)."""
    return not args.no_progress and os.environ.get("EASEL_NO_PROGRESS") != "1"


def _shard(args) -> tuple[int, int] | None:
    from components.sharding import parse_shard

    return parse_shard(args.shard) if getattr(args, "shard", None) else None


def _metrics(params, stage: str) -> Path:
    return Path(params.reporting.metrics_dir) / f"{stage}.json"


def _plots(params, *parts: str) -> Path:
    return Path(params.reporting.plots_dir, *parts)


def _logs_dir(args) -> Path:
    """The logs folder of the params this command reads (the default where they do not load)."""
    from components.config import reporting_params

    return Path(reporting_params(args.params).logs_dir)


# -- stages --------------------------------------------------------------------------------------


def cmd_download(args) -> int:
    from components.download import run_download

    params = _load(args)
    shard = _shard(args)
    summary = run_download(
        params.download,
        _metrics(params, "download"),
        progress=_progress(args),
        shard=shard,
        write_manifest=not args.no_manifest,
        storage=params.storage,
    )
    print(summary.table())
    if summary.manifest:
        print(f"manifest: {summary.manifest}")
    return 0


def cmd_validate(args) -> int:
    from components.validate import run_validate

    params = _load(args)
    if args.archived and not _shard(args):
        raise EaselError("validate: --archived indexes a shard's files; it needs --shard K/N")
    if shard := _shard(args):
        from components.validate.stage import inspect_shard

        archived = None
        if args.archived:
            from components.plumbing.fsutil import read_archive_index

            archived = read_archive_index(args.archived)
        files, now = inspect_shard(params.validate_, Path(params.download.out_dir), shard, _progress(args), archived)
        print(f"validate shard {args.shard}: {files} files, {now} inspected now, {files - now} from the cache")
        return 0
    summary = run_validate(
        params.validate_,
        Path(params.download.out_dir),
        _metrics(params, "validate"),
        progress=_progress(args),
        models=params.models,
    )
    print(f"validate: {summary.accepted} accepted, {summary.rejected} rejected of {summary.rows} images")
    for rule, count in sorted(summary.per_rule.items()):
        print(f"  rejected by {rule}: {count}")
    print(f"report: {summary.report}")
    return 0


def cmd_caption(args) -> int:
    from components.caption import run_caption

    params = _load(args)
    if shard := _shard(args):
        from components.caption.stage import caption_shard

        images, now = caption_shard(
            params.caption, params.models, Path(params.validate_.out_dir), shard, _progress(args)
        )
        print(f"caption shard {args.shard}: {images} images, {now} captioned now, {images - now} from the cache")
        return 0
    summary = run_caption(
        params.caption,
        params.models,
        Path(params.validate_.out_dir),
        _metrics(params, "caption"),
        progress=_progress(args),
    )
    print(
        f"caption: {summary.computed} captioned now, {summary.cached} from cache, {summary.failed} failed, "
        f"{summary.over_token_limit} over the CLIP token limit"
    )
    print(f"captions: {summary.table}\nreport: {summary.report}")
    return 0


def cmd_train(args) -> int:
    from components.train import run_train

    params = _load(args)
    if args.plan:
        from components.train.loop import load_training_items, plan_run
        from components.train.plan import fits, plan_training

        captions = Path(params.caption.out_dir)
        if (captions / "captions.parquet").is_file():  # the images known: what a rerun wrote counts as there
            plan = plan_run(params.train, params.models, load_training_items(captions))
        else:
            plan = plan_training(params.train, params.models)
        print(plan.render())
        return 0 if fits(plan) else 2
    summary = run_train(
        params.train,
        params.models,
        Path(params.caption.out_dir),
        _metrics(params, "train"),
        _plots(params, "train"),
        progress=_progress(args),
    )
    from accelerate import PartialState

    if PartialState().is_main_process:  # one line per run, not per process
        print(
            f"train: {summary.steps} steps, final loss {summary.final_loss:.4f}, {summary.images_per_second:.2f} img/s"
        )
        print(f"model: {summary.model_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from components.evaluate import run_evaluate

    params = _load(args)
    model_dir = Path(args.model) if args.model else Path(params.train.out_dir) / "model"
    if shard := _shard(args):
        from components.evaluate.stage import generate_shard

        images, now = generate_shard(
            params.evaluate, params.models, model_dir, shard, _progress(args), params.storage, params.promote
        )
        print(f"evaluate shard {args.shard}: {images} images, {now} generated now, {images - now} from the cache")
        return 0
    summary = run_evaluate(
        params.evaluate,
        params.models,
        model_dir,
        _metrics(params, "evaluate"),
        _plots(params, "evaluate", "scores.csv"),
        progress=_progress(args),
        storage=params.storage,
        promote=params.promote,
    )
    a, c = summary.summary["aesthetic"], summary.summary["clip_score"]
    print(
        f"evaluate: {summary.images} images; aesthetic mean {a['mean']:.4f} (std {a['std']:.4f}); "
        f"CLIP score mean {c['mean']:.4f} (std {c['std']:.4f})"
    )
    for name, comp in summary.summary["comparisons"].items():
        d = comp["aesthetic"]
        print(
            f"  {name}: aesthetic {d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], "
            f"win rate {d['win_rate']:.0%} over {d['prompts']} prompts"
        )
    board, panel = summary.summary["leaderboard"], summary.summary["panel"]
    earlier = [name for name, p in panel.items() if p["scored"] == "earlier"]
    print(
        f"leaderboard: {board['path']} ({board['models']} models on this prompt set"
        + (f"; not scored again: {', '.join(earlier)}" if earlier else "")
        + ")"
    )
    print(f"report: {summary.report}")
    return 0


def cmd_gate(args) -> int:
    """The gate alone: decide and record, publish nothing (the PR eval gate runs this)."""
    from components.plumbing.fsutil import atomic_write_text
    from components.release.promote import pr_comment, raise_unless_promoted, run_gate

    params = _load(args)
    out_dir = Path(args.out) if args.out else Path("data/gate")
    model_dir = Path(params.train.out_dir) / "model"
    decision = run_gate(params.gate, params.promote, params.storage, params.evaluate, model_dir, out_dir=out_dir)
    if args.comment:
        atomic_write_text(args.comment, pr_comment(decision, args.report_url))
    print(f"gate: {decision['verdict']} ({out_dir / 'decision.md'})")
    raise_unless_promoted(decision, "gate:")
    return 0


def cmd_promote(args) -> int:
    from components.release.promote import run_promote

    params = _load(args)
    model_dir = Path(params.train.out_dir) / "model"
    eval_dir = Path(params.evaluate.out_dir)
    decision = run_promote(
        params.gate,
        params.promote,
        params.storage,
        params.evaluate,
        model_dir,
        extras={
            "evaluation_report.html": eval_dir / "report.html",
            "evaluation_report.md": eval_dir / "report.md",
            "model_card.md": model_dir / "README.md",
        },
    )
    if decision["verdict"] == "unchanged":
        version = decision["inputs"]["production_version"]
        print(f"promote: unchanged: {params.promote.model_name} {version} is already {params.promote.alias}")
        print(f"decision: {Path(params.promote.out_dir) / 'decision.md'}")
        return 0
    reg = decision["registry"]
    print(f"promote: {params.promote.model_name} {reg['version']} is now {reg['alias']} (was {reg['previous']})")
    print(f"registry: {reg['uri']}\ndecision: {Path(params.promote.out_dir) / 'decision.md'}")
    return 0


# -- tools ---------------------------------------------------------------------------------------


def cmd_s3(args) -> int:
    from components.storage import ENDPOINT_ENV, EmbeddedS3, configure_dvc_remote, ready_client

    params = _load(args)
    server = EmbeddedS3.from_params(params.storage)
    if args.action == "start":
        if os.environ.get(ENDPOINT_ENV):
            print(f"{ENDPOINT_ENV} is set: using that endpoint, not starting the embedded server")
        else:
            started = server.start()
            print(f"embedded S3 {'started' if started else 'already running'} at {server.endpoint_url}")
        settings, _ = ready_client(params.storage)
        configure_dvc_remote(Path.cwd(), params.storage, settings)
        print(
            f"bucket s3://{params.storage.bucket} ready; DVC remote 'easel' -> "
            f"s3://{params.storage.bucket}/{params.storage.dvc_prefix}"
        )
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    else:
        print(f"embedded S3 at {server.endpoint_url}: {'running' if server.is_running() else 'not running'}")
    return 0


def cmd_prefect(args) -> int:
    from components.prefect_server import WEBHOOK_URL_ENV, LocalPrefectServer, ensure_automation, local_server

    params = _load(args)
    server = LocalPrefectServer.from_params(params.orchestration.prefect)
    if args.action == "start":
        started = server.start()
        print(f"Prefect server {'started' if started else 'already running'}: UI {server.ui_url}")
        print(f"clients: export PREFECT_API_URL={server.api_url}")
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    elif args.action == "status":
        print(f"Prefect server at {server.ui_url}: {'running' if server.is_running() else 'not running'}")
    else:
        api_url = os.environ.get("PREFECT_API_URL")
        with local_server(Path.cwd(), args.params) as ui:
            automation_id, done = ensure_automation(params.orchestration.notify, os.environ.get(WEBHOOK_URL_ENV))
        ui = ui or api_url
        states = ", ".join(params.orchestration.notify.states)
        print(
            f"automation {done} on {ui} ({automation_id}): runs ending {states} notify block "
            f"{params.orchestration.notify.block!r}"
        )
    return 0


def cmd_models(args) -> int:
    from components.models.loaders import TINY_ROOT
    from components.models.tiny import build_tiny_models

    root = build_tiny_models(Path(args.out) if args.out else TINY_ROOT, force=args.force)
    print(f"tiny models: {root}")
    return 0


def cmd_export(args) -> int:
    from components.models.single_file import export_single_file

    params = _load(args)
    model_dir = Path(args.model) if args.model else Path(params.train.out_dir) / "model"
    out = Path(args.out) if args.out else Path(".easel/export") / f"{params.promote.model_name}.safetensors"
    path = export_single_file(model_dir, out, args.precision)
    print(f"export: {path} ({args.precision}); model card {path.with_suffix('.md')}")
    return 0


def cmd_sample_source(args) -> int:
    from components.plumbing import procs
    from components.sample_source import SampleSite, build_site

    params = _load(args)
    source = params.sample_source
    pid_file = Path(source.dir) / "serve.pid"
    if args.action == "stop":
        print("stopped" if procs.stop(pid_file) else "not running")
        return 0
    site_dir = build_site(Path(source.dir) / "site")
    if args.action == "build":
        print(f"sample site built in {site_dir}")
        return 0
    if args.action == "start":  # in the background, for scripts and CI; `easel sample-source stop` ends it
        if procs.read_pid(pid_file) and procs.port_open(source.port, source.host):
            print(f"sample site already running at http://{source.host}:{source.port}")
            return 0
        command = [sys.executable, "-m", "components.cli", "--params", args.params, "sample-source", "serve"]
        proc = procs.spawn(command, pid_file, Path(source.dir) / "serve.log")
        deadline = time.monotonic() + 30
        while not procs.port_open(source.port, source.host):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise EaselError(f"the sample site did not start; see {Path(source.dir) / 'serve.log'}")
            time.sleep(0.1)
        print(f"sample site running at http://{source.host}:{source.port} (pid {proc.pid})")
        return 0
    site = SampleSite(site_dir, source.host, source.port)
    print(f"serving {site_dir} at {site.base_url} (Ctrl+C to stop)")
    with contextlib.suppress(KeyboardInterrupt):
        site.server.serve_forever()
    return 0


def cmd_registry(args) -> int:
    import json

    from components.release.registry import Registry
    from components.storage import ready_client

    params = _load(args)
    settings, client = ready_client(params.storage)
    registry = Registry(client, settings, params.storage.bucket, params.storage.registry_prefix)
    name = args.name or params.promote.model_name
    if args.action == "list":
        aliases: dict[str, list[str]] = {}
        records = sorted(registry.aliases(name).items())
        for alias_name, record in records:
            aliases.setdefault(record["version"], []).append(alias_name)
        for manifest in registry.list_versions(name):
            tags = ", ".join(aliases.get(manifest["version"], []))
            print(
                f"{manifest['version']}  {manifest['created_at']}  {len(manifest['files'])} files"
                + (f"  [{tags}]" if tags else "")
            )
        # Every alias, checked: one pointing at a version that is gone or not whole is flagged.
        for alias_name, record in records:
            problems = registry.check_whole(name, record["version"])
            state = "whole" if not problems else f"NOT WHOLE: {'; '.join(problems[:3])}"
            print(f"{alias_name} -> {record['version']}  ({state})")
    elif args.action == "show":
        ref = args.ref or params.promote.alias
        record = registry.manifest(name, ref) or registry.alias(name, ref)
        if record is None:
            raise EaselError(f"registry: {name} has no version or alias {ref!r}")
        print(json.dumps({k: v for k, v in record.items() if k != "files"}, indent=2))
    elif args.action == "download":
        manifest = registry.download(name, args.ref or params.promote.alias, Path(args.dest))
        print(f"downloaded {name} {manifest['version']} to {args.dest} ({len(manifest['files'])} files verified)")
    elif args.action == "promote":
        if not args.ref:
            raise EaselError("registry promote needs a VERSION")
        record = registry.set_alias(name, args.alias or params.promote.alias, args.ref, "promoted by hand")
        print(f"{name}@{record['alias']} -> {record['version']}")
    elif args.action == "rollback":
        record = registry.rollback(name, args.alias or params.promote.alias, args.ref)
        print(f"{name}@{record['alias']} rolled back to {record['version']} (was {record['history'][0]['version']})")
    elif args.action == "verify":
        ref = args.ref or params.promote.alias
        record = None if registry.manifest(name, ref) else registry.alias(name, ref)
        version = record["version"] if record else ref
        problems = registry.verify(name, version)
        if problems:
            more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise EaselError(f"registry verify: {name}/{version} is not whole: {'; '.join(problems[:5])}{more}")
        manifest = registry.manifest(name, version)
        count = len(manifest["files"]) + len(manifest.get("extras", []))
        print(f"{name}/{version}{f' ({ref})' if record else ''}: whole, {count} files read back and hashed")
    elif args.action == "is-current":
        from components.plumbing.fsutil import model_fingerprint

        alias_name = args.alias or params.promote.alias
        model_dir = Path(args.ref) if args.ref else Path(params.train.out_dir) / "model"
        if not (model_dir / "model_index.json").is_file():
            raise EaselError(f"{model_dir}: no model (no model_index.json); run the train stage or name a model folder")
        record = registry.alias(name, alias_name)
        production = registry.manifest(name, record["version"]) if record else None
        ours = model_fingerprint(model_dir)
        if production and production.get("model_fingerprint") == ours:
            print(f"{model_dir} is {name}@{alias_name} ({record['version']}): the same fingerprint")
            return 0
        where = f"{record['version']}" if record else "no version"
        print(f"{model_dir} is not {name}@{alias_name} ({where})")
        return NOT_CURRENT_EXIT
    elif args.action == "gc":
        garbage = registry.garbage(name, older_than_s=args.older_than_hours * 3600)
        for key in garbage.objects:
            print(f"orphan object   {registry.uri(key)}")
        for key, upload_id in garbage.uploads:
            print(f"pending upload  {registry.uri(key)} ({upload_id})")
        found = f"{len(garbage.objects)} orphan objects ({garbage.bytes} bytes), {len(garbage.uploads)} pending uploads"
        if args.apply:
            registry.collect(name, garbage)
            print(f"removed {found}")
        else:
            print(f"would remove {found} (dry run; --apply removes them)")
    return 0


def cmd_config(args) -> int:
    from components.config import effective_params_yaml

    print(effective_params_yaml(_load(args)), end="")
    return 0


def cmd_demo(args) -> int:
    from components.demo import run_demo

    return run_demo(Path(args.params), stages=args.stages)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easel", description="Fine-tune SDXL on curated images; promote only models that pass the gate."
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    descriptions = {
        "download": "Fetch the images of the URL lists in params.yaml into a content-addressed store + manifest.",
        "validate": "Check every image with the Great Expectations suite; write accepted/rejected sets and a report.",
        "caption": "Caption each accepted image with BLIP.",
        "train": "Fine-tune the SDXL U-Net on the captioned images and save a diffusers pipeline.",
        "evaluate": "Generate the prompt set with fixed seeds; score CLIP and aesthetic; summarise and report.",
        "promote": "Run the gate; on promote, publish to the registry, move the alias (exit 3 reject, 4 inconclusive).",
    }
    funcs = {
        "download": cmd_download,
        "validate": cmd_validate,
        "caption": cmd_caption,
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "promote": cmd_promote,
    }
    for stage in STAGES:
        p = add(stage, funcs[stage], descriptions[stage])
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if stage == "train":
            p.add_argument(
                "--plan",
                action="store_true",
                help="print the memory and disk the run needs, and whether they fit; train nothing",
            )
        if stage == "evaluate":
            p.add_argument("--model", help="pipeline folder to evaluate (default: the train stage's model)")
        if stage == "download":
            p.add_argument("--shard", help="fetch only shard K of N (K/N), for fanning out over workers")
            p.add_argument("--no-manifest", action="store_true", help="fetch only; a later run writes the manifest")
        if stage in ("validate", "caption", "evaluate"):
            work = {"validate": "inspect", "caption": "caption", "evaluate": "generate"}[stage]
            p.add_argument(
                "--shard",
                help=f"{work} only shard K of N (K/N) into the stage's cache and write no output; "
                "the stage run after every shard writes the outputs",
            )
        if stage == "validate":
            p.add_argument(
                "--archived",
                metavar="INDEX",
                help="with --shard: inspect exactly the image files this JSON index names, each read in "
                "place from a tar archive ({path: [archive, offset, size, sha256]}, paths relative to "
                "the project): the share a flow handed the shard, not every N-th file",
            )

    p = add(
        "gate",
        cmd_gate,
        "Run the promotion gate on the evaluation; record the decision; publish nothing "
        "(exit 0 promote, 3 reject, 4 inconclusive, 2 unusable input).",
    )
    p.add_argument("--out", help="decision folder (default: data/gate)")
    p.add_argument("--comment", help="also write the PR comment (Markdown) to this file")
    p.add_argument("--report-url", help="link to the evaluation report, for the comment")

    p = add("s3", cmd_s3, "Start, stop or check the embedded S3 server (SeaweedFS on 127.0.0.1).")
    p.add_argument("action", choices=["start", "stop", "status"])
    p = add(
        "prefect",
        cmd_prefect,
        "Start, stop or check the local Prefect server (UI and API on 127.0.0.1); create the notifying automation.",
    )
    p.add_argument("action", choices=["start", "stop", "status", "automation"])
    p = add("models", cmd_models, "Build the tiny offline model set (random weights, real formats).")
    p.add_argument("action", choices=["build-tiny"])
    p.add_argument("--out", help="folder (default: .easel/models/tiny)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p = add("export", cmd_export, "Write the trained model as one single-file SDXL checkpoint (original SGM layout).")
    p.add_argument("--model", help="diffusers pipeline folder (default: the train stage's model)")
    p.add_argument("--out", help="the .safetensors file (default: .easel/export/<promote.model_name>.safetensors)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16", help="tensor dtype (default fp16)")
    p = add("sample-source", cmd_sample_source, "Build, serve, or start/stop in the background the sample image site.")
    p.add_argument("action", choices=["build", "serve", "start", "stop"])
    p = add("registry", cmd_registry, "List, show, download, promote, roll back or clean models in the S3 registry.")
    p.add_argument("action", choices=["list", "show", "download", "promote", "rollback", "gc", "verify", "is-current"])
    p.add_argument(
        "ref",
        nargs="?",
        help="version or alias (show, download, verify: default the alias); version (promote; rollback --to); "
        "a model folder (is-current: "
        f"exit 0 if the alias points at this model, {NOT_CURRENT_EXIT} if not; default: the train stage's model)",
    )
    p.add_argument("--alias", help="alias for promote/rollback (default: promote.alias)")
    p.add_argument("--name", help="model name (default: promote.model_name)")
    p.add_argument("--dest", default="downloaded-model", help="download folder")
    p.add_argument("--apply", action="store_true", help="gc: remove what it finds (default: only list it)")
    p.add_argument(
        "--older-than-hours", type=float, default=24.0, help="gc: only what is older (spares a publish running now)"
    )
    add("config", cmd_config, "Print the effective parameters (profile applied).").add_argument(
        "action", choices=["show"]
    )
    p = add("demo", cmd_demo, "Run the whole pipeline offline on the embedded defaults (tiny models, local S3).")
    p.add_argument("--stages", nargs="*", help="only these stages (default: all six)")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "botocore", "urllib3", "great_expectations", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except GateRejected as exc:  # a verdict, not an error: 3 reject, 4 inconclusive
        print(f"easel {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except EaselError as exc:
        print(f"easel {args.command}: error: {exc.line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"easel {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the safety net: a bug, not bad input; the tests cover the inputs
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        where = traceback_file(exc, _logs_dir(args))
        print(f"easel {args.command}: unexpected error: {one_line(exc)} ({where})", file=sys.stderr)
        return 1


TRACEBACK_ENV = "EASEL_TRACEBACK"  # 1: show an unexpected error's traceback here instead of in a log file


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def traceback_file(exc: BaseException, logs_dir: Path) -> str:
    """Write the traceback to a log file; say where (or, if no file can be written, how to see it)."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(exc))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (logs_dir, Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"easel-error-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return f"traceback in {path}; {TRACEBACK_ENV}=1 shows it here"
        except OSError:
            continue
    return f"run again with {TRACEBACK_ENV}=1 to see the traceback"


if __name__ == "__main__":
    sys.exit(main())
