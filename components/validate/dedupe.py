"""Near-duplicates by perceptual hash: group, keep one per group, say which and why.

Candidate pairs come from banding: if two 64-bit hashes differ in at most d bits, then split into
d + 1 bands at least one band is identical (pigeonhole), so only hashes sharing a band are
compared. Groups are the connected components of "within d bits".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from components.validate.inspect import hamming


def _bands(hash_hex: str, bands: int) -> list[tuple[int, int]]:
    value = int(hash_hex, 16)
    edges = [round(64 * i / bands) for i in range(bands + 1)]
    return [(i, (value >> edges[i]) & ((1 << (edges[i + 1] - edges[i])) - 1)) for i in range(bands)]


def near_duplicate_groups(hashes: Sequence[str | None], max_distance: int) -> list[list[int]]:
    """Groups (of two or more indices) of hashes within max_distance bits of each other, transitively."""
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, value in enumerate(hashes):
        if value:
            for band in _bands(value, max_distance + 1):
                buckets[band].append(index)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1 :]:
                pair = (a, b) if a < b else (b, a)
                if pair in checked:
                    continue
                checked.add(pair)
                if hamming(hashes[a], hashes[b]) <= max_distance:
                    parent[find(a)] = find(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for index, value in enumerate(hashes):
        if value:
            groups[find(index)].append(index)
    return [sorted(g) for g in groups.values() if len(g) > 1]


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
