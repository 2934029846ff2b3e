"""The model panel and the cumulative leaderboard (issue 15, item 4): any number of models scored beside
the candidate on the same prompts, seeds and guidance; the guide's table, kept across runs, keyed by
model fingerprint, prompt set and protocol; models already on it are not scored again."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.config import EvaluateParams, ModelsParams, PanelModelParams, StorageParams, load_params
from components.evaluate import leaderboard, run_evaluate
from components.evaluate.models import panel_model
from components.evaluate.stats import summarize
from components.models import single_file as sf
from components.models.tiny import build_tiny_sdxl
from components.plumbing.errors import ConfigError, EaselError
from tests.helpers import (
    evaluation_scores,
    make_model,
    put_in_production,
    sdxl_gate_params,
    tiny_evaluate_params,
    write_evaluation,
    write_prompts,
)
from tests.test_models import tiny_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def others(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Two models that are not the candidate: a diffusers folder (other random weights) and a single file."""
    root = tmp_path_factory.mktemp("panel")
    build_tiny_sdxl(root / "other", seed=1)
    build_tiny_sdxl(root / "merged-src", seed=2)
    single = sf.export_single_file(root / "merged-src", root / "merged.safetensors", "fp32")
    return {"folder": root / "other", "file": single}


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text(
        "id,prompt,negative_prompt,category\n"
        "p1,a cat poster,basic,poster\np2,a cup ad,,ad\np3,a rocket poster,,poster\n"
    )
    return path


def panel_params(tmp_path, tiny_models, others, **overrides) -> EvaluateParams:
    panel = [
        {"name": "other", "ref": str(others["folder"])},
        {"name": "merged", "ref": str(others["file"]), "config": str(tiny_models / "sdxl")},
    ]
    return tiny_evaluate_params(tmp_path, prompts_file(tmp_path), compare_with=["base"], panel=panel, **overrides)


def board_of(params: EvaluateParams) -> pd.DataFrame:
    return pd.read_csv(params.leaderboard, dtype={"model_fingerprint": str})


def test_panel_models_are_scored_beside_the_candidate_and_kept_on_the_leaderboard(tmp_path, tiny_models, others):
    params = panel_params(tmp_path, tiny_models, others)
    models = tiny_params(tiny_models)
    first = run_evaluate(params, models, tiny_models / "sdxl", progress=False)
    scores = pd.read_csv(tmp_path / "eval" / "scores.csv")
    assert scores.groupby("model").size().to_dict() == {"candidate": 6, "base": 6, "other": 6, "merged": 6}
    # The same prompts, seeds and settings for every model; other weights give other images and scores.
    for name in ("base", "other", "merged"):
        mine = scores[scores["model"] == name]
        assert (
            mine[["prompt_id", "seed"]].values.tolist()
            == scores[scores["model"] == "candidate"][["prompt_id", "seed"]].values.tolist()
        )
    assert not scores.loc[scores["model"] == "other", "aesthetic_score"].equals(
        scores.loc[scores["model"] == "candidate", "aesthetic_score"].reset_index(drop=True)
    )
    # Paired comparisons stay against base (or production); the panel has none.
    assert set(first.summary["comparisons"]) == {"vs_base"} and set(first.summary["models"]) == {"base"}
    assert {n: p["scored"] for n, p in first.summary["panel"].items()} == {"other": "now", "merged": "now"}

    board = board_of(params)
    assert list(board.columns[:13]) == list(leaderboard.GUIDE_COLUMNS)  # the guide's MyModelSummary_Total.csv
    # candidate and base are the same weights here: one model, one row (named by the last role that scored it)
    assert sorted(board["Model"]) == ["base", "merged", "other"]
    for name in ("other", "merged"):
        row = board.set_index("Model").loc[name]
        table = summarize(scores[scores["model"] == name])
        assert row["count_LAIONScore"] == 6 and row["prompts"] == 3 and row["seeds"] == "0 1"
        assert row["mean_LAIONScore"] == pytest.approx(table["aesthetic"]["mean"], rel=1e-12)
        assert row["kurtosis_LAIONScore"] == pytest.approx(table["aesthetic"]["kurtosis"], rel=1e-9)
        assert row["Clipscore_std"] == pytest.approx(table["clip_score"]["std"], rel=1e-12)
        assert row["model_fingerprint"] == first.summary["panel"][name]["model_fingerprint"]
    assert board.set_index("Model").loc["merged", "model_fingerprint"].startswith("sha256:")
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Leaderboard" in md and "| merged |" in md and "candidate, base" in md
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("<img") >= 3 * 4 * 2  # one grid per prompt: 4 models x 2 seeds
    assert "rows: candidate, base, other, merged" in html


def test_models_already_on_the_leaderboard_are_not_scored_again(tmp_path, tiny_models, others, monkeypatch):
    params = panel_params(tmp_path, tiny_models, others)
    models = tiny_params(tiny_models)
    run_evaluate(params, models, tiny_models / "sdxl", progress=False)
    before = board_of(params)

    from components import scoring

    scored: list[int] = []
    original = scoring.ImageTextScorer.score
    monkeypatch.setattr(
        scoring.ImageTextScorer,
        "score",
        lambda self, paths, *a, **k: scored.append(len(paths)) or original(self, paths, *a, **k),
    )
    # A fresh image cache: the leaderboard alone says the panel models were scored, so they are not generated.
    fresh = params.model_copy(update={"cache_dir": str(tmp_path / "fresh")})
    again = run_evaluate(fresh, models, tiny_models / "sdxl", progress=False)
    assert scored == [12]  # candidate and base only
    assert set(pd.read_csv(tmp_path / "eval" / "scores.csv")["model"]) == {"candidate", "base"}
    assert {n: p["scored"] for n, p in again.summary["panel"].items()} == {"other": "earlier", "merged": "earlier"}
    after = board_of(params)
    keep = ["Model", "mean_LAIONScore", "model_fingerprint", "scored_at"]
    pd.testing.assert_frame_equal(
        before[before["Model"] != "base"][keep].reset_index(drop=True),
        after[after["Model"] != "base"][keep].reset_index(drop=True),
    )
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("not in the image cache") == 2 * 6  # their images were only in the other cache
    # With their images in the cache, the grid shows them, marked as scored earlier.
    run_evaluate(params, models, tiny_models / "sdxl", progress=False)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("scored in an earlier run") == 2 * 6 and "not in the image cache" not in html
    assert (tmp_path / "eval" / "images" / "merged" / "p1__seed0.png").is_file()

    # Other seeds are another protocol: the panel is scored again, and the old rows stay in the file.
    reseeded = params.model_copy(update={"seeds": [5]})
    result = run_evaluate(reseeded, models, tiny_models / "sdxl", progress=False)
    assert {p["scored"] for p in result.summary["panel"].values()} == {"now"}
    board = board_of(params)
    assert len(board) == 6 and board["protocol_sha256"].nunique() == 2
    assert (
        "3 more row(s) in the file were scored on another prompt set or protocol"
        in (tmp_path / "eval" / "report.md").read_text()
    )


def test_registry_versions_and_aliases_in_the_panel(tmp_path, tiny_models, s3_server, monkeypatch):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # the registry download cache is project-relative
    bucket = "panel-" + os.urandom(3).hex()
    _, version = put_in_production(s3_server.settings(), bucket, tiny_models / "sdxl")
    storage = StorageParams(bucket=bucket, embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)})
    panel = [
        {"name": "v-pinned", "ref": f"registry:posters/{version}"},
        {"name": "in-production", "ref": "registry:posters/production"},
    ]
    params = tiny_evaluate_params(tmp_path, prompts_file(tmp_path), compare_with=["base"], panel=panel)
    result = run_evaluate(params, tiny_params(tiny_models), tiny_models / "sdxl", progress=False, storage=storage)
    refs = {n: p["ref"] for n, p in result.summary["panel"].items()}
    assert refs == {"v-pinned": f"registry:posters/{version}", "in-production": f"registry:posters/{version}"}
    # The version's fingerprint is the candidate's (the same weights): the cached images are shared.
    assert {p["model_fingerprint"] for p in result.summary["panel"].values()} == {
        "sha256:" + result.summary["model_fingerprint"]
    }
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 6
    missing = PanelModelParams(name="gone", ref="registry:posters/v-0000000000000000")
    with pytest.raises(ConfigError, match=r"evaluate.panel\[3\].ref: the registry has no version or alias"):
        panel_model(missing, 3, tiny_params(tiny_models), storage)


def test_bad_panel_references_name_their_key(tmp_path, tiny_models):
    models = tiny_params(tiny_models)
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"a pickle")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    cases = [
        ({"ref": str(tmp_path / "absent")}, models, r"panel\[0\].ref: .* is not a diffusers folder, a .safetensors"),
        (
            {"ref": str(tmp_path / "not-a-pipeline")},
            models,
            r"panel\[0\].ref: .* not a diffusers pipeline \(no model_index.json\)",
        ),
        ({"ref": str(tmp_path / "model.ckpt")}, models, r"panel\[0\].ref: .*only .safetensors single files"),
        ({"ref": str(tmp_path / "model.safetensors")}, models, r"panel\[0\].config: .* is a single file"),
        ({"ref": "registry:posters/v-1"}, models, r"panel\[0\].ref: registry:posters/v-1 needs the storage"),
    ]
    for entry, m, message in cases:
        with pytest.raises(ConfigError, match=message):
            panel_model(PanelModelParams(name="x", **entry), 0, m, None)


@pytest.mark.parametrize(
    ("evaluate", "message"),
    [
        ({"panel": [{"name": "base", "ref": "x"}]}, r"evaluate.panel\[0\].name: .*'base' names one of the evaluation"),
        ({"panel": [{"name": "a", "ref": "x"}, {"name": "a", "ref": "y"}]}, r"evaluate.panel: .*unique; repeated: a"),
        ({"panel": [{"name": "a", "ref": "registry:posters"}]}, r"evaluate.panel\[0\].ref: .*registry:<model_name>/"),
        ({"panel": [{"name": "My Model", "ref": "x"}]}, r"evaluate.panel\[0\].name: String should match pattern"),
        ({"panel": [{"name": "a", "ref": "x", "weights": 1}]}, r"evaluate.panel\[0\].weights: unknown key"),
        ({"leaderboard": "data/evaluate/board.csv"}, r"evaluate.leaderboard: .*lies in evaluate.out_dir"),
        ({"leaderboard": "data/leaderboard.xlsx"}, r"evaluate.leaderboard: .*must be a .csv file"),
    ],
)
def test_bad_panel_params_are_refused_with_their_key(tmp_path, evaluate, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["evaluate"].update(evaluate)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "params.yaml")


def write_board(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows, columns=list(leaderboard.COLUMNS)).to_csv(path, index=False)
    return path


def a_row(**change) -> dict:
    table = {
        "aesthetic": {"count": 4, "mean": 5.5, "std": 0.2, "min": 5.2, "25%": 5.4, "50%": 5.5, "75%": 5.6, "max": 5.8}
        | {"skew": 0.1, "kurtosis": -1.2},
        "clip_score": {"mean": 0.27, "std": 0.01},
    }
    return leaderboard.row("m", "panel", "/m", "sha256:aa", table, "p" * 64, "q" * 64, [0, 1]) | change


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_text("Model,count_LAIONScore\nx,3\n"), r"board.csv: lacks the column\(s\) mean_LAIONScore"),
        (
            lambda p: write_board(p, [a_row(), a_row(mean_LAIONScore="high", model_fingerprint="b")]),
            r"board.csv line 3: mean_LAIONScore 'high' is not a number",
        ),
        (lambda p: write_board(p, [a_row(Clipscore_mean="inf")]), r"board.csv line 2: Clipscore_mean 'inf' is not a"),
        (lambda p: write_board(p, [a_row(model_fingerprint=" ")]), r"board.csv line 2: model_fingerprint is empty"),
        (lambda p: write_board(p, [a_row(), a_row(Model="again")]), r"board.csv line 3: the same model, prompt set"),
        (lambda p: p.write_bytes(b'Model,"count\n'), r"board.csv: cannot be read as CSV"),
    ],
)
def test_a_damaged_leaderboard_is_an_error_naming_its_line(tmp_path, damage, message):
    path = tmp_path / "board.csv"
    damage(path)
    with pytest.raises(EaselError, match=message):
        leaderboard.read(path)


def test_leaderboard_rows_round_trip_and_replace_in_place(tmp_path):
    path = tmp_path / "board.csv"
    leaderboard.update(path, [a_row(), a_row(model_fingerprint="sha256:bb", Model="n")])
    leaderboard.update(path, [a_row(mean_LAIONScore=7.25, Model="renamed")])  # the same key: replaced in its place
    board = leaderboard.read(path)
    assert board["Model"].tolist() == ["renamed", "n"] and board["mean_LAIONScore"].tolist() == [7.25, 5.5]
    assert path.read_text().splitlines()[1].split(",")[1] == "4"  # counts stay integers
    assert [p.name for p in tmp_path.iterdir()] == ["board.csv"]  # no temp or lock file left


def _add_rows(path: str, worker: int, count: int) -> None:
    for i in range(count):
        leaderboard.update(path, [a_row(model_fingerprint=f"sha256:{worker}-{i}")])


def test_concurrent_evaluations_both_land_on_the_leaderboard(tmp_path):
    path = str(tmp_path / "board.csv")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_rows, args=(path, w, 15)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(leaderboard.read(path)) == 30  # read-modify-write under the lock: no update lost


def test_panel_rows_in_scores_do_not_move_the_gate(tmp_path):
    from components.config import BootstrapParams
    from components.release.gate import gather_inputs, judge

    prompts = write_prompts(tmp_path / "prompts.csv", 12)
    model = make_model(tmp_path / "model")
    ids = pd.read_csv(prompts, dtype=str)["id"].tolist()
    plain = evaluation_scores(ids)
    # A panel model far worse than the candidate, with a prompt it lacks: the gate must not read it.
    panel = evaluation_scores(ids, references=("cyber",), aesthetic=3.0, clip=0.1)
    panel = panel[(panel["model"] == "cyber") & (panel["prompt_id"] != ids[0])]
    params = EvaluateParams(out_dir=str(tmp_path / "eval"), prompts=str(prompts), bootstrap={"resamples": 2000})
    results = []
    for name, scores in (("plain", plain), ("with-panel", pd.concat([plain, panel], ignore_index=True))):
        folder = write_evaluation(tmp_path / name, model, prompts, scores=scores, bootstrap=(0.95, 2000, 0))
        inputs = gather_inputs(folder / "summary.json", folder / "scores.csv", model, params, None)
        results.append(judge(inputs, sdxl_gate_params(), BootstrapParams(resamples=2000)))
    assert results[0].verdict == results[1].verdict == "promote"
    assert [(r.rule, r.status) for r in results[0].rules] == [(r.rule, r.status) for r in results[1].rules]
    values = [[(r.rule, r.value) for r in res.rules if r.rule != "evaluated_these_scores"] for res in results]
    assert values[0] == values[1] and results[0].metrics == results[1].metrics


def test_easel_evaluate_refuses_a_bad_panel_entry_in_one_line_and_keeps_the_old_report(tmp_path, tiny_models):
    project = tmp_path / "project"
    (project / ".easel" / "models").mkdir(parents=True)
    (project / ".easel" / "models" / "tiny").symlink_to(tiny_models)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["tiny"]["evaluate"] = {"height": 64, "width": 64, "num_inference_steps": 2, "max_prompts": 2}
    raw["evaluate"] |= {
        "prompts": str(prompts_file(tmp_path)),
        "compare_with": ["base"],
        "panel": [{"name": "cyber", "ref": "models/cyberrealistic.safetensors"}],
    }
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    old = project / "data" / "evaluate" / "report.md"
    old.parent.mkdir(parents=True)
    old.write_text("the previous evaluation")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def evaluate() -> subprocess.CompletedProcess:
        command = ["easel", "evaluate", "--model", str(tiny_models / "sdxl")]
        return subprocess.run(command, cwd=project, capture_output=True, text=True, env=env)

    run = evaluate()
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "easel evaluate: error: params.yaml: evaluate.panel[0].ref: 'models/cyberrealistic.safetensors' is not a "
        "diffusers folder, a .safetensors file or registry:<model_name>/<version>"
    ]
    assert old.read_text() == "the previous evaluation" and not (project / "data" / "leaderboard.csv").exists()

    # A damaged leaderboard: one line naming the file and the line, nothing replaced either.
    raw["evaluate"]["panel"] = []
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    write_board(project / "data" / "leaderboard.csv", [a_row(prompts="many")])
    run = evaluate()
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "easel evaluate: error: data/leaderboard.csv line 2: prompts 'many' is not a number (evaluate.leaderboard: "
        "fix the file, or delete it to start a new one)"
    ]
    assert old.read_text() == "the previous evaluation"


def test_a_single_file_panel_model_uses_its_own_vae_not_the_base_override(tiny_models, others, tmp_path):
    models = tiny_params(tiny_models).model_copy(update={"vae": str(tmp_path / "some-vae"), "sdxl_config": "cfg"})
    model = panel_model(PanelModelParams(name="merged", ref=str(others["file"])), 0, models, None)
    assert model.load_with is not None and model.load_with.vae is None and model.load_with.sdxl_config == "cfg"
    assert model.identity.endswith("+config:cfg") and isinstance(model.load_with, ModelsParams)
