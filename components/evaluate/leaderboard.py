"""The cumulative leaderboard: every model ever scored, one row per (model, prompt set, protocol).

It is the guide's `MyModelSummary_Total.csv`, with its columns and their names (`Model`,
`count_LAIONScore` ... `kurtosis_LAIONScore`, `Clipscore_mean`, `Clipscore_std`), plus the keys that
make two rows comparable:
- `model_fingerprint`: the model's identity (its content hash; what the image cache keys on);
- `prompt_set_sha256`: the prompt file's sha256 (as in summary.json);
- `protocol_sha256`: everything else that changes the numbers: the prompts actually generated
  (after `max_prompts`, with their negative prompts), the seeds, the generation settings (guidance,
  sampler, steps, size) and the scorer's models.
A model whose key is already on the board is not generated or scored again (the guide skipped models
already in its table the same way). Rows with another prompt set or protocol stay in the file, but
the report ranks only those comparable with the current run.

The file lives outside `evaluate.out_dir` (which every run replaces whole) and is a DVC output with
`persist: true` (DVC does not delete it before the stage runs) and `cache: false` (a small text file
that git versions, like the metrics). Updates are read-modify-write under an exclusive lock, written
to a temp file and renamed, so two evaluations at once both land and a killed one leaves the old file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from components.evaluate.stats import AESTHETIC_STATS
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_write_text

# The guide's column names, in its order.
GUIDE_COLUMNS = (
    "Model",
    *(f"{stat}_LAIONScore" for stat in AESTHETIC_STATS),
    "Clipscore_mean",
    "Clipscore_std",
)
KEY_COLUMNS = ("model_fingerprint", "prompt_set_sha256", "protocol_sha256")
RECORD_COLUMNS = ("role", "ref", "prompts", "seeds", "scored_at")
COLUMNS = (*GUIDE_COLUMNS, *KEY_COLUMNS, *RECORD_COLUMNS)
NUMERIC_COLUMNS = (*GUIDE_COLUMNS[1:], "prompts")


def protocol_hash(prompts: pd.DataFrame, seeds: Sequence[int], generation_key: str, scorer: str) -> str:
    """What, besides the model and the prompt file, decides the numbers of a leaderboard row."""
    payload = {
        "prompts": prompts[["id", "prompt", "negative_prompt"]].astype(str).values.tolist(),
        "seeds": [int(s) for s in seeds],
        "generation": generation_key,
        "scorer": scorer,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def row(
    name: str,
    role: str,
    ref: str,
    fingerprint: str,
    table: dict,
    prompt_set_sha256: str,
    protocol_sha256: str,
    seeds: Sequence[int],
) -> dict:
    """A leaderboard row from a model's summary table (components.evaluate.stats.summarize)."""
    aesthetic, clip = table["aesthetic"], table["clip_score"]
    count = int(aesthetic["count"])
    values = {f"{stat}_LAIONScore": aesthetic[stat] for stat in AESTHETIC_STATS}
    return {
        "Model": name,
        **values,
        "Clipscore_mean": clip["mean"],
        "Clipscore_std": clip["std"],
        "model_fingerprint": fingerprint,
        "prompt_set_sha256": prompt_set_sha256,
        "protocol_sha256": protocol_sha256,
        "role": role,
        "ref": ref,
        "prompts": count // max(len(seeds), 1),
        "seeds": " ".join(str(s) for s in seeds),
        "scored_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float if c in NUMERIC_COLUMNS else object) for c in COLUMNS})


def read(path: Path | str) -> pd.DataFrame:
    """The leaderboard (empty if there is none yet); a damaged file is an error that names its line."""
    path = Path(path)
    if not path.exists():
        return empty()
    hint = "(evaluate.leaderboard: fix the file, or delete it to start a new one)"
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EaselError(f"{path}: cannot be read as CSV ({first}) {hint}") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise EaselError(f"{path}: lacks the column(s) {', '.join(missing)} {hint}")
    for column in NUMERIC_COLUMNS:
        text = table[column].str.strip()
        values = pd.to_numeric(text.mask(text == ""), errors="coerce")
        bad = (values.isna() & (text != "")) | values.isin([math.inf, -math.inf])
        if bad.any():
            line = int(table.index[bad][0]) + 2  # the header is line 1
            raise EaselError(f"{path} line {line}: {column} {text[bad].iloc[0]!r} is not a number {hint}")
        table[column] = values.astype(float)
    for column in KEY_COLUMNS:
        blank = table[column].str.strip() == ""
        if blank.any():
            raise EaselError(f"{path} line {int(table.index[blank][0]) + 2}: {column} is empty {hint}")
    repeated = table.duplicated(list(KEY_COLUMNS))
    if repeated.any():
        line = int(table.index[repeated][0]) + 2
        raise EaselError(f"{path} line {line}: the same model, prompt set and protocol as an earlier line {hint}")
    return table


def _same_key(board: pd.DataFrame, fingerprint: str, prompt_set_sha256: str, protocol_sha256: str) -> pd.Series:
    return (
        (board["model_fingerprint"] == fingerprint)
        & (board["prompt_set_sha256"] == prompt_set_sha256)
        & (board["protocol_sha256"] == protocol_sha256)
    )


def has(board: pd.DataFrame, fingerprint: str, prompt_set_sha256: str, protocol_sha256: str) -> bool:
    return bool(_same_key(board, fingerprint, prompt_set_sha256, protocol_sha256).any())


def upsert(board: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """The board with `rows` in it: a row replaces one with the same key, in its place; new rows go last."""
    board = board.reset_index(drop=True).copy()
    for new in rows:
        same = _same_key(board, *(new[c] for c in KEY_COLUMNS))
        if same.any():
            index = board.index[same][0]
            for column, value in new.items():
                board.at[index, column] = value
        else:
            board = pd.concat([board, pd.DataFrame([new])], ignore_index=True)
    for column in ("count_LAIONScore", "prompts"):  # counts stay integers in the file
        board[column] = pd.to_numeric(board[column]).round().astype("Int64")
    return board


def standings(board: pd.DataFrame, prompt_set_sha256: str, protocol_sha256: str) -> pd.DataFrame:
    """The rows comparable with this run (same prompt set and protocol), best mean aesthetic first."""
    mine = board[(board["prompt_set_sha256"] == prompt_set_sha256) & (board["protocol_sha256"] == protocol_sha256)]
    return mine.sort_values(["mean_LAIONScore", "Clipscore_mean"], ascending=False, kind="stable")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the leaderboard's folder, held across read-modify-write (no lock file is left)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def update(path: Path | str, rows: list[dict]) -> pd.DataFrame:
    """Add (or replace) rows in the leaderboard file, atomically; returns the board as written."""
    path = Path(path)
    with locked(path):
        board = upsert(read(path), rows)
        atomic_write_text(path, board.to_csv(index=False))
    return board
