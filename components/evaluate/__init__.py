"""Evaluate stage: reproducible paired evaluation of the candidate against production and base.

`models` resolves the models to compare (the candidate, the production model from the registry,
the base model), `cache` keeps generated images by (model, prompt, seed, settings), `stats` holds
the guide's summary table and the paired bootstrap comparison, and `stage` generates, scores,
compares and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.errors import EaselError

__all__ = ["read_summary", "run_evaluate"]


def read_summary(path: Path | str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EaselError(f"{path}: evaluation summary not found; run the evaluate stage first") from None
    except json.JSONDecodeError as exc:
        raise EaselError(f"{path}: evaluation summary is not valid JSON: {exc}") from None


def __getattr__(name: str):
    if name == "run_evaluate":
        from components.evaluate.stage import run_evaluate

        return run_evaluate
    raise AttributeError(name)
