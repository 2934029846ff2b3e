"""The caption stage with the tiny BLIP: batched, cached per image and captioner config."""

import json

import pandas as pd

from components.caption import run_caption
from components.config import CaptionParams
from tests.helpers import accepted_set
from tests.test_models import tiny_params


def test_captions_are_cached_and_config_changes_recompute(tmp_path, tiny_models):
    _, validate = accepted_set(tmp_path, count=5)
    params = CaptionParams(out_dir=str(tmp_path / "caption"), batch_size=2, max_new_tokens=8)
    models = tiny_params(tiny_models)
    first = run_caption(params, models, validate, tmp_path / "m.json", progress=False)
    assert (first.computed, first.cached, first.failed) == (5, 0, 0)
    table = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
    assert len(table) == 5 and table["caption"].str.len().gt(0).all()
    again = run_caption(params, models, validate, progress=False)
    assert (again.computed, again.cached) == (0, 5)  # same config: nothing recomputed
    changed = run_caption(params.model_copy(update={"max_new_tokens": 4}), models, validate, progress=False)
    assert changed.computed == 5  # a new captioner config recomputes
    assert json.loads((tmp_path / "m.json").read_text())["captioned"] == 5


def test_a_file_that_no_longer_decodes_is_reported_and_skipped(tmp_path, tiny_models):
    download, validate = accepted_set(tmp_path, count=3)
    accepted = pd.read_parquet(validate / "accepted.parquet")
    (download / accepted["path"][1]).write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    summary = run_caption(
        CaptionParams(out_dir=str(tmp_path / "caption")), tiny_params(tiny_models), validate, progress=False
    )
    assert (summary.computed, summary.failed) == (2, 1)
    table = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
    assert accepted["sha256"][1] not in set(table["sha256"])
    assert "Failed" in (tmp_path / "caption" / "report.html").read_text()
