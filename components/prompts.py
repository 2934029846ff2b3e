"""The evaluation prompt set and the guide's negative-prompt presets.

A prompt set is a CSV with columns id, prompt, negative_prompt, category. `negative_prompt` holds
a preset name below, literal text, or nothing (then `evaluate.negative_prompt` applies).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from components.plumbing.errors import EaselError
from components.plumbing.fsutil import sha256_file

# "Examples of Commonly Used Negative Prompts" from the user's SDXL fine-tuning guide.
NEGATIVE_PRESETS: dict[str, str] = {
    "basic": (
        "worst quality, normal quality, low quality, low res, blurry, text, watermark, logo, banner, "
        "extra digits, cropped, jpeg artifacts, signature, username, error, sketch, duplicate, ugly, "
        "monochrome, horror, geometry, mutation, disgusting"
    ),
    "animated_characters": (
        "bad anatomy, bad hands, three hands, three legs, bad arms, missing legs, missing arms, poorly drawn "
        "face, bad face, fused face, cloned face, worst face, three crus, extra crus, fused crus, worst feet, "
        "three feet, fused feet, fused thigh, three thigh, fused thigh, extra thigh, worst thigh, missing "
        "fingers, extra fingers, ugly fingers, long fingers, horn, realistic photo, extra eyes, huge eyes, "
        "2girl, amputation, disconnected limbs"
    ),
    "realistic_characters": (
        "bad anatomy, bad hands, three hands, three legs, bad arms, missing legs, missing arms, poorly drawn "
        "face, bad face, fused face, cloned face, worst face, three crus, extra crus, fused crus, worst feet, "
        "three feet, fused feet, fused thigh, three thigh, fused thigh, extra thigh, worst thigh, missing "
        "fingers, extra fingers, ugly fingers, long fingers, horn, extra eyes, huge eyes, 2girl, amputation, "
        "disconnected limbs, cartoon, cg, 3d, unreal, animate"
    ),
    "non_adult": "nsfw, nude, censored",
}

REQUIRED_COLUMNS = ("id", "prompt")
# Prompt ids name image files, so they are restricted to safe characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def resolve_negative(value: str | None, default: str | None) -> str:
    """A preset name becomes its text; literal text stays; empty falls back to the default."""
    text = (value or "").strip() or (default or "").strip()
    return NEGATIVE_PRESETS.get(text, text)


def load_prompt_set(
    path: Path | str, default_negative: str | None = None, max_prompts: int | None = None
) -> pd.DataFrame:
    """Read and check a prompt set; returns id, prompt, negative_prompt (resolved), category.

    With `max_prompts`, a stable subset of that many: the categories take turns, each in file order,
    so a quick run still covers every category.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise EaselError(f"{path}: prompt set not found") from None
    except pd.errors.EmptyDataError:
        raise EaselError(f"{path}: the prompt set is empty (not even a header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise EaselError(f"{path}: cannot be read as CSV: {str(exc).strip().splitlines()[0]}") from None
    except OSError as exc:
        raise EaselError(f"{path}: prompt set cannot be read ({exc.strerror})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise EaselError(f"{path}: missing column(s) {', '.join(missing)}; have {', '.join(table.columns)}")
    if table.empty:
        raise EaselError(f"{path}: the prompt set is empty")
    dupes = sorted(table.loc[table["id"].duplicated(), "id"].unique())
    if dupes:
        raise EaselError(f"{path}: prompt ids must be unique; repeated: {', '.join(dupes)}")
    bad_ids = [i for i in table["id"] if not ID_PATTERN.fullmatch(i.strip())]
    if bad_ids:
        raise EaselError(f"{path}: prompt ids may use letters, digits, '.', '_' and '-' only; bad: {bad_ids[:5]}")
    empty = table.index[table["prompt"].str.strip() == ""].tolist()
    if empty:
        raise EaselError(f"{path}: row(s) {', '.join(str(i + 2) for i in empty)} have an empty prompt")
    negatives = table["negative_prompt"] if "negative_prompt" in table.columns else [""] * len(table)
    categories = table["category"] if "category" in table.columns else ["all"] * len(table)
    prompts = pd.DataFrame(
        {
            "id": table["id"].str.strip(),
            "prompt": table["prompt"].str.strip(),
            "negative_prompt": [resolve_negative(v, default_negative) for v in negatives],
            "category": [c.strip() or "all" for c in categories],
        }
    )
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    turn = prompts.groupby("category", sort=False).cumcount()  # 0 for each category's first prompt, ...
    order = pd.DataFrame({"turn": turn, "row": range(len(prompts))}).sort_values(["turn", "row"], kind="stable")
    chosen = sorted(order["row"].iloc[:max_prompts])
    return prompts.iloc[chosen].reset_index(drop=True)


def prompt_set_hash(path: Path | str) -> str:
    return sha256_file(path)
