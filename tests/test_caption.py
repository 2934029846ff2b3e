"""The caption stage with the tiny BLIP and tiny WD-style tagger: merging, hygiene, token counts,
per-captioner caching, resume after a kill, and bad images."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

from components.caption import run_caption
from components.caption.merge import clip_token_count, merge_caption, normalize_tag
from components.caption.tagger import select_tags
from components.config import CaptionParams, TaggerParams
from components.plumbing.errors import EaselError
from tests.helpers import accepted_set
from tests.test_models import tiny_params


def models_for(tiny_models):
    return tiny_params(tiny_models).model_copy(update={"tagger": str(tiny_models / "tagger")})


@pytest.mark.parametrize(
    ("template", "kw", "expected"),
    [
        (
            "{trigger}, {source_or_blip}, {tags}",
            {"trigger": "easelposter", "source": None, "blip": "a cat in a bag", "tags": ["cat", "bag"]},
            "easelposter, a cat in a bag, cat, bag",
        ),
        (
            "{trigger}, {source_or_blip}, {tags}",
            {"trigger": None, "source": "Movie poster", "blip": "a rocket", "tags": ["rocket"]},
            "Movie poster, rocket",
        ),
        ("{source}, {blip}, {tags}", {"trigger": None, "source": "", "blip": "a cup", "tags": []}, "a cup"),
        (
            "{blip}, {tags}",
            {"trigger": None, "source": None, "blip": "a cat", "tags": ["a cat", "long_hair", "^_^"]},
            "a cat, long hair, ^_^",
        ),
    ],
)
def test_merge_template_cases(template, kw, expected):
    assert merge_caption(template, replacements={}, **kw) == expected


def test_hygiene_replacements_exclusions_and_limits():
    caption = merge_caption(
        "{trigger}, {blip}, {tags}",
        trigger="tok",
        source=None,
        blip="a  girl   smiling",
        tags=["1girl", "long_hair", "watermark", "long_hair", "smile", "Long Hair", "cat"],
        replacements={"1girl": "one girl"},
        exclude=["watermark"],
        max_tags=3,
    )
    # excluded and repeated tags do not count towards max_tags; dedupe is case-insensitive
    assert caption == "tok, a girl smiling, one girl, long hair, smile"
    assert normalize_tag("hatsune_miku") == "hatsune miku" and normalize_tag(">_<") == ">_<"


@pytest.mark.parametrize(
    ("blip", "expected"),
    [
        ("arafed woman in a red dress", "woman in a red dress"),
        ("there is an araffe poster on the wall", "there is a poster on the wall"),
        ("a arafed orange cat", "an orange cat"),
        ("Araffed man next to an arafe", "man next to"),
        ("a portrait of yasser arafat", "a portrait of yasser arafat"),  # a real name stays
    ],
)
def test_blip_artefacts_are_dropped_from_captions(blip, expected):
    """BLIP large's made-up words (from LAION's alt texts) never reach the training captions."""
    caption = merge_caption("{blip}", trigger=None, source=None, blip=blip, tags=[], replacements={})
    assert caption == expected


def test_word_replacements_apply_inside_parts_to_whole_words_only():
    caption = merge_caption(
        "{blip}, {tags}",
        trigger=None,
        source=None,
        blip="a 1girl standing by a tshirt shop",
        tags=["1girl", "tshirts"],
        replacements={"1girl": "solo"},  # whole parts first
        word_replacements={"1girl": "one girl", "tshirt": "t-shirt"},
    )
    assert caption == "a one girl standing by a t-shirt shop, solo, tshirts"


def test_tag_selection_by_category_threshold_and_confidence():
    scored = [
        ("general", 0.9, 9),
        ("sensitive", 0.2, 9),
        ("cat", 0.6, 0),
        ("dog", 0.3, 0),
        ("poster", 0.95, 0),
        ("kirby", 0.8, 4),
        ("pikachu", 0.9, 4),
    ]
    params = TaggerParams(general_threshold=0.35, character_threshold=0.85)
    assert select_tags(scored, params) == ["poster", "pikachu", "cat"]  # most confident first
    assert select_tags(scored, params.model_copy(update={"include_rating": True}))[0] == "general"


def test_clip_token_counting_flags_truncation():
    assert clip_token_count("a cat") == 2  # what max_token_length counts: no <start>, <end>
    long = ", ".join(f"tag{i}" for i in range(60))
    assert clip_token_count(long) > 75


def test_the_token_report_uses_the_limit_training_and_generation_use(tmp_path, tiny_models):
    _, validate = accepted_set(tmp_path, count=2)
    trigger = " ".join(f"word{i}" for i in range(60))  # every caption starts with 120-odd tokens
    params = CaptionParams(
        out_dir=str(tmp_path / "caption"), trigger=trigger, blip={"max_new_tokens": 4}, tagger={"enabled": False}
    )
    models = models_for(tiny_models)
    for limit, over in ((75, 2), (150, 2), (225, 0)):
        summary = run_caption(params, models.model_copy(update={"max_token_length": limit}), validate, progress=False)
        table = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
        assert summary.over_token_limit == over and table["over_token_limit"].sum() == over, (
            limit,
            table["clip_tokens"],
        )
    assert (table["clip_tokens"] > 150).all() and (table["clip_tokens"] <= 225).all()


def test_a1111_comma_breaks_cut_a_caption_that_fits_the_token_count():
    """A1111 ends a chunk after a comma among its last 20 tokens: a caption of 150 tokens or fewer can
    then need three chunks, and at max_token_length 150 its end is not read. The caption table
    flags it in a1111 mode, not in the modes that cut every 75 tokens."""
    from components.caption.merge import clip_comma_id, clip_token_ids
    from components.sdxl.prompt_encoding import tokens_read

    caption = " ".join(["poster"] * 60) + ", " + " ".join(["blue"] * 80)  # a comma at token 61 of 141
    ids, comma = clip_token_ids(caption), clip_comma_id()
    assert len(ids) == 141
    assert tokens_read(ids, 150, "kohya", comma) == tokens_read(ids, 150, "comfyui", comma) == len(ids)
    # a1111: chunk 1 ends after the comma (61 tokens), chunk 2 holds 75, the last 5 would need a third.
    assert tokens_read(ids, 150, "a1111", comma) == 136 < len(ids)
    assert tokens_read(ids, 225, "a1111", comma) == len(ids)


def test_captions_cache_per_captioner_and_config(tmp_path, tiny_models):
    _, validate = accepted_set(tmp_path, count=5)
    params = CaptionParams(
        out_dir=str(tmp_path / "caption"),
        batch_size=2,
        blip={"max_new_tokens": 8, "num_beams": 1},
        tagger={"general_threshold": 0.05},
    )
    models = models_for(tiny_models)
    first = run_caption(params, models, validate, tmp_path / "m.json", progress=False)
    assert (first.computed, first.cached, first.failed) == (5, 0, 0)
    table = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
    assert len(table) == 5 and table["caption"].str.len().gt(0).all() and table["tags"].str.len().gt(0).all()
    assert set(json.loads(table["captioners"][0])) == {"blip", "tagger"}
    cache = tmp_path / "caption" / "cache.jsonl"
    lines = len(cache.read_text().splitlines())
    assert lines == 10  # one entry per image per captioner

    again = run_caption(params, models, validate, progress=False)
    assert (again.computed, again.cached) == (0, 5) and len(cache.read_text().splitlines()) == lines

    # The template and thresholds apply to cached outputs: no model runs.
    reworded = params.model_copy(update={"template": "{trigger}, {tags}, {blip}", "trigger": "easelposter"})
    run_caption(reworded, models, validate, progress=False)
    assert len(cache.read_text().splitlines()) == lines
    table = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
    assert table["caption"].str.startswith("easelposter, ").all()

    # A new BLIP configuration recomputes BLIP's column only.
    run_caption(
        params.model_copy(update={"blip": params.blip.model_copy(update={"max_new_tokens": 4})}),
        models,
        validate,
        progress=False,
    )
    new = [json.loads(x)["captioner"] for x in cache.read_text().splitlines()[lines:]]
    assert len(new) == 5 and all(k.startswith("blip-") for k in new)


def test_a_table_read_in_chunks_gives_the_captions_metrics_and_report_of_one_read(tmp_path, tiny_models, monkeypatch):
    """accepted.parquet read 3 rows at a time, in batches of 2 that run on across the chunks: the
    same captions, metrics and report as one read, from the same batches (the journal lists them in
    the same order). A resumed run, whose journal holds a stale entry, every output and a torn last
    line, computes nothing and writes the same table."""
    from components.caption import stage

    download, validate = accepted_set(tmp_path, count=7)
    accepted = pd.read_parquet(validate / "accepted.parquet")
    (download / accepted["path"][4]).write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")  # skipped, in the second chunk
    models = models_for(tiny_models)

    def run(name: str):
        out = tmp_path / name
        params = CaptionParams(out_dir=str(out), batch_size=2, blip={"max_new_tokens": 8, "num_beams": 1})
        summary = run_caption(params, models, validate, out / "metrics.json", progress=False)
        outputs = [(out / f).read_text() for f in ("metrics.json", "report.html")]
        return summary, pd.read_parquet(out / "captions.parquet"), outputs

    whole, whole_table, whole_outputs = run("whole")
    monkeypatch.setattr(stage, "CHUNK_ROWS", 3)
    chunked, chunked_table, chunked_outputs = run("chunked")
    assert (chunked.computed, chunked.failed) == (whole.computed, whole.failed) == (6, 1)
    pd.testing.assert_frame_equal(chunked_table, whole_table)
    assert chunked_outputs == whole_outputs
    journal = (tmp_path / "whole" / "cache.jsonl").read_text()
    assert (tmp_path / "chunked" / "cache.jsonl").read_text() == journal

    first = json.loads(journal.splitlines()[0])
    stale = json.dumps(first | {"output": "a stale caption"}) + "\n"  # the journal's later line wins
    torn = journal.splitlines()[-1][:40]  # a run killed while writing
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "cache.jsonl").write_text(stale + journal + torn)
    resumed, resumed_table, resumed_outputs = run("resumed")
    assert (resumed.computed, resumed.cached, resumed.failed) == (0, 6, 1)
    assert (tmp_path / "resumed" / "cache.jsonl").read_text() == stale + journal + torn  # nothing computed
    pd.testing.assert_frame_equal(resumed_table, whole_table)
    assert resumed_outputs == whole_outputs


def test_a_file_that_no_longer_decodes_is_reported_and_skipped(tmp_path, tiny_models):
    download, validate = accepted_set(tmp_path, count=3)
    accepted = pd.read_parquet(validate / "accepted.parquet")
    (download / accepted["path"][1]).write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    summary = run_caption(
        CaptionParams(out_dir=str(tmp_path / "caption")), models_for(tiny_models), validate, progress=False
    )
    assert (summary.computed, summary.failed) == (2, 1)
    table = pd.read_parquet(tmp_path / "caption" / "captions.parquet")
    assert accepted["sha256"][1] not in set(table["sha256"])
    assert "Skipped (could not be read)" in (tmp_path / "caption" / "report.html").read_text()


def test_resume_after_a_kill(tmp_path, tiny_models, monkeypatch):
    """kill -9 mid-run, then run again: only what was missing is computed, and the killed run's
    scratch index is removed."""
    _, validate = accepted_set(tmp_path, count=24)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "caption"
    script = (
        "import sys, time; from pathlib import Path\n"
        "from components.config import CaptionParams\n"
        "from components.caption import stage\n"
        "from tests.test_caption import models_for\n"
        "original = stage.CaptionCache.add_many\n"
        "def slow(self, key, items):\n"
        "    original(self, key, items); time.sleep(0.3)\n"
        "stage.CaptionCache.add_many = slow\n"
        f"stage.run_caption(CaptionParams(out_dir={str(out)!r}, batch_size=2), models_for(Path({str(tiny_models)!r})),"
        f" Path({str(validate)!r}), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), env={**os.environ, "TMPDIR": str(scratch)})
    cache = out / "cache.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not cache.is_file() or len(cache.read_text().splitlines()) < 8):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(cache.read_text().splitlines())
    assert 8 <= done < 48 and not (out / "captions.parquet").exists()
    assert [p.name.rsplit("-", 1)[0] for p in scratch.iterdir() if p.is_dir()] == ["easel-caption"]
    summary = run_caption(
        CaptionParams(out_dir=str(out), batch_size=2), models_for(tiny_models), validate, progress=False
    )
    assert list(scratch.iterdir()) == []
    entries = []
    for line in cache.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by the kill is ignored, as the stage ignores it
            continue
    assert len({(e["captioner"], e["sha256"]) for e in entries}) == 48  # 24 images x 2 captioners
    assert len(entries) <= 48 + 2  # nothing done twice, but for the batch the kill interrupted
    assert summary.computed + summary.cached == 24


def test_no_captioner_is_a_clear_error(tmp_path, tiny_models):
    _, validate = accepted_set(tmp_path, count=1)
    params = CaptionParams(out_dir=str(tmp_path / "c"), blip={"enabled": False}, tagger={"enabled": False})
    with pytest.raises(EaselError, match="enable at least one captioner"):
        run_caption(params, models_for(tiny_models), validate, progress=False)
