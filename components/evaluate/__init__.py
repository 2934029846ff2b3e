"""Evaluate stage: reproducible paired evaluation of the candidate against production and base.

`models` resolves the models to compare (the candidate, the production model from the registry,
the base model), `cache` keeps generated images by (model, prompt, seed, settings), `stats` holds
the guide's summary table and the paired bootstrap comparison, and `stage` generates, scores,
compares and reports.
"""

from __future__ import annotations

__all__ = ["run_evaluate"]


def __getattr__(name: str):
    if name == "run_evaluate":
        from components.evaluate.stage import run_evaluate

        return run_evaluate
    raise AttributeError(name)
