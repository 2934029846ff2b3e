"""The numbers evaluate reports: the guide's per-model table and paired comparisons.

Comparisons are paired by prompt: each model's score for a prompt is the mean over its seeds,
the difference is taken prompt by prompt, and a bootstrap confidence interval of the mean
difference (scipy.stats.bootstrap, paired, BCa) says how sure we are.

How much the prompt set can tell is planned with the paired t-test's power (noncentral t): the
gate's non-inferiority rule is the one-sided test "mean difference > -margin" at level
alpha = (1 - confidence) / 2, the level at which the CI's lower bound excludes -margin.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

# scipy (about 0.4 s to import) is imported where it is used: an evaluate shard, which only
# generates, reads this module's names through the stage and the leaderboard.
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
    import scipy.stats

    with warnings.catch_warnings():  # near-identical scores: scipy warns and the moments are undefined (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
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
    import scipy.stats

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
        sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan")
        result[SUMMARY_NAMES[metric]] = {
            "mean_diff": float(diff.mean()) if len(diff) else float("nan"),
            "ci_low": low,
            "ci_high": high,
            "win_rate": wins,
            "prompts": len(diff),
            "sd_diff": sd,
            # the smallest non-inferiority margin these prompts detect at 80% power
            "mde_80": min_detectable_margin(sd, len(diff), one_sided_alpha(confidence), 0.8),
        }
    result["confidence"] = confidence
    return result


def score_summary(scores: pd.DataFrame, others: list[str], confidence: float, resamples: int, seed: int) -> dict:
    """The candidate's table, every other model's, the candidate's paired comparison with each, by category."""
    candidate = scores[scores["model"] == "candidate"]
    return summarize(candidate) | {
        "models": {name: summarize(scores[scores["model"] == name]) for name in others},
        "comparisons": {
            f"vs_{name}": paired_comparison(scores, "candidate", name, confidence, resamples, seed) for name in others
        },
        "by_category": by_category(candidate),
    }


def one_sided_alpha(confidence: float) -> float:
    """The one-sided level at which a two-sided `confidence` CI's lower bound excludes a value."""
    return (1.0 - confidence) / 2.0


def noninferiority_power(sd: float, n: int, margin: float, alpha: float, true_diff: float = 0.0) -> float:
    """P(the paired one-sided t-test at level alpha shows difference > -margin | true difference).

    NaN when there is no spread to plan with (n < 2, or sd not positive and finite).
    """
    if n < 2 or not (np.isfinite(sd) and sd > 0) or not np.isfinite(margin):
        return float("nan")
    import scipy.stats

    df = n - 1
    critical = scipy.stats.t.ppf(1.0 - alpha, df)
    noncentrality = (true_diff + margin) / (sd / np.sqrt(n))
    return float(scipy.stats.nct.sf(critical, df, noncentrality))


def min_detectable_margin(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest margin that n paired prompts with this spread detect with `power` (true difference 0)."""
    if n < 2 or not (np.isfinite(sd) and sd > 0):
        return float("nan")
    import scipy.optimize

    high = sd  # grow until the power is reached, then bisect
    while noninferiority_power(sd, n, high, alpha) < power:
        high *= 2
    return float(scipy.optimize.brentq(lambda m: noninferiority_power(sd, n, m, alpha) - power, 0.0, high))


def prompts_needed(sd: float, margin: float, alpha: float, power: float = 0.8, limit: int = 1_000_000) -> int | None:
    """The fewest paired prompts that detect `margin` with `power` at this spread; None if none up to limit."""
    if not (np.isfinite(sd) and sd > 0) or not (np.isfinite(margin) and margin > 0):
        return None
    if noninferiority_power(sd, limit, margin, alpha) < power:
        return None
    low, high = 2, limit  # power grows with n: bisect for the first n that reaches it
    while low < high:
        mid = (low + high) // 2
        if noninferiority_power(sd, mid, margin, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return low
