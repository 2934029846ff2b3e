"""The numbers evaluate reports: the guide's per-model table and paired comparisons.

Comparisons are paired by prompt: each model's score for a prompt is the mean over its seeds,
the difference is taken prompt by prompt, and a bootstrap confidence interval of the mean
difference (scipy.stats.bootstrap, paired, BCa) says how sure we are.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.stats

AESTHETIC_STATS = ("count", "mean", "std", "min", "25%", "50%", "75%", "max", "skew", "kurtosis")
METRICS = ("aesthetic_score", "clip_score")
# How each metric is named in summaries (the guide's table calls the first one "aesthetic").
SUMMARY_NAMES = {"aesthetic_score": "aesthetic", "clip_score": "clip_score"}


def summarize(scores: pd.DataFrame) -> dict:
    """The guide's per-model table.

    Aesthetic: pandas `describe()` (std with ddof=1), skew and excess kurtosis from scipy with
    bias=True; CLIP score: mean and numpy's std (ddof=0). NaN scores stay NaN (the gate fails
    closed on them).
    """
    aesthetic = scores["aesthetic_score"].astype(float)
    described = aesthetic.describe()
    stats = {name: float(described[name]) for name in AESTHETIC_STATS[:-2]}
    stats["count"] = int(described["count"])
    stats["skew"] = float(scipy.stats.skew(aesthetic, bias=True))
    stats["kurtosis"] = float(scipy.stats.kurtosis(aesthetic, fisher=True, bias=True))
    clip = scores["clip_score"].astype(float).to_numpy()
    return {"aesthetic": stats, "clip_score": {"mean": float(np.mean(clip)), "std": float(np.std(clip))}}


def by_category(scores: pd.DataFrame) -> dict:
    return {
        str(cat): {
            "count": len(group),
            "aesthetic_mean": float(group["aesthetic_score"].mean()),
            "clip_score_mean": float(group["clip_score"].mean()),
        }
        for cat, group in scores.groupby("category")
    }


def bootstrap_mean_ci(differences: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """A bootstrap CI of the mean of paired differences (BCa; percentile if BCa is undefined)."""
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2 or np.allclose(differences, differences[0]):
        value = float(differences.mean()) if len(differences) else float("nan")
        return value, value  # no spread: the interval is the point
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = scipy.stats.bootstrap(
                (differences,),
                np.mean,
                confidence_level=confidence,
                n_resamples=resamples,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high)
    return float("nan"), float("nan")


def per_prompt(scores: pd.DataFrame, model: str, metric: str) -> pd.Series:
    """A model's score for each prompt: the mean over its seeds."""
    return scores[scores["model"] == model].groupby("prompt_id")[metric].mean()


def paired_comparison(
    scores: pd.DataFrame, candidate: str, other: str, confidence: float, resamples: int, seed: int
) -> dict:
    """Candidate minus other, per metric: mean paired difference, its CI, and the win rate."""
    result = {}
    for metric in METRICS:
        a, b = per_prompt(scores, candidate, metric), per_prompt(scores, other, metric)
        common = a.index.intersection(b.index)
        diff = (a[common] - b[common]).to_numpy()
        low, high = bootstrap_mean_ci(diff, confidence, resamples, seed)
        wins = float(np.mean(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0)))) if len(diff) else float("nan")
        result[SUMMARY_NAMES[metric]] = {
            "mean_diff": float(diff.mean()) if len(diff) else float("nan"),
            "ci_low": low,
            "ci_high": high,
            "win_rate": wins,
            "prompts": len(diff),
        }
    result["confidence"] = confidence
    return result
