"""Optional EMU-style quality tuning: keep the best accepted images by LAION aesthetic score.

The scorer is the evaluate stage's (components.scoring): one implementation of the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.config import CurateParams, ModelsParams


def aesthetic_scores(paths: Sequence[Path | str], models: ModelsParams, batch_size: int, progress: bool) -> np.ndarray:
    from components.scoring import ImageTextScorer

    scorer = ImageTextScorer(models, batch_size=batch_size)
    return scorer.aesthetic_scores(scorer.embed_images(list(paths), progress))


def keep_mask(scores: np.ndarray, params: CurateParams) -> np.ndarray:
    """Which images to keep: above min_aesthetic, and within the top keep_top_share (when set)."""
    keep = np.ones(len(scores), dtype=bool)
    if params.min_aesthetic is not None:
        keep &= scores >= params.min_aesthetic
    if params.keep_top_share is not None and len(scores):
        count = max(1, int(np.ceil(params.keep_top_share * len(scores))))
        order = np.argsort(-scores, kind="stable")
        top = np.zeros(len(scores), dtype=bool)
        top[order[:count]] = True
        keep &= top
    return keep
