"""Near-duplicates by perceptual hash: group, keep one per group, say which and why.

Candidate pairs come from banding: if two 64-bit hashes differ in at most d bits, then split into
d + 1 bands at least one band is identical (pigeonhole), so only hashes sharing a band are
compared. Groups are the connected components of "within d bits".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from components.validate.inspect import hamming


def near_duplicate_groups(hashes: Sequence[str | None], max_distance: int) -> list[list[int]]:
    """Groups (of two or more indices) of hex hashes within max_distance bits of each other,
    transitively; a missing hash is in no group."""
    present = [i for i, value in enumerate(hashes) if value]
    values = np.array([int(hashes[i], 16) for i in present], dtype=np.uint64)
    return [[present[j] for j in group] for group in hash_groups(values, max_distance)]


def hash_groups(values: np.ndarray, max_distance: int) -> list[list[int]]:
    """Groups of positions of 64-bit hashes within max_distance bits of each other, transitively:
    each group ascending, the groups in the order of their first position. Memory is a few arrays
    the size of `values`; Python loops only over hashes that share a band."""
    count = len(values)
    bands = max_distance + 1
    edges = [round(64 * i / bands) for i in range(bands + 1)]
    pairs_a, pairs_b = [], []
    for low, high in pairwise(edges):
        keys = (values >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], count]
        for start, end in zip(starts, ends, strict=True):
            if end - start < 2:
                continue
            members = order[start:end]
            band = values[members]
            if len(members) <= 256:  # all pairs at once
                close = np.triu(np.bitwise_count(band[:, None] ^ band[None, :]) <= max_distance, 1)
                first, second = np.nonzero(close)
                pairs_a.append(members[first])
                pairs_b.append(members[second])
                continue
            for k in range(len(members) - 1):  # a big bucket: one row at a time, memory stays linear
                close = np.bitwise_count(band[k] ^ band[k + 1 :]) <= max_distance
                pairs_a.append(np.full(int(close.sum()), members[k]))
                pairs_b.append(members[k + 1 :][close])
    if not pairs_a or not sum(map(len, pairs_a)):
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    graph = coo_matrix((np.ones(len(a), dtype=bool), (a, b)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for position in np.unique(np.concatenate([a, b])):  # ascending: groups come in order of their first
        groups.setdefault(int(labels[position]), []).append(int(position))
    return list(groups.values())


@dataclass(frozen=True)
class Candidate:
    index: int
    sha256: str
    url: str
    width: int
    height: int
    kb_per_pixel: float
    phash: str


def choose_kept(group: Sequence[Candidate]) -> tuple[Candidate, dict[int, str]]:
    """The image to keep (most pixels, then most bytes per pixel, then listed first) and why
    each other one was dropped."""
    kept = min(group, key=lambda c: (-(c.width * c.height), -c.kb_per_pixel, c.index))
    notes = {}
    for other in group:
        if other is kept:
            continue
        if kept.width * kept.height > other.width * other.height:
            why = f"kept one is larger ({kept.width}x{kept.height} vs {other.width}x{other.height})"
        elif kept.kb_per_pixel > other.kb_per_pixel:
            why = f"kept one has more bytes per pixel ({kept.kb_per_pixel:.5f} vs {other.kb_per_pixel:.5f} KB)"
        else:
            why = "same size and quality; kept the one listed first"
        notes[other.index] = f"{hamming(kept.phash, other.phash)} pHash bits from {kept.url}; {why}"
    return kept, notes
