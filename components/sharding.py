"""Shards: how a heavy stage's work is split over processes or machines, the same way everywhere.

A shard run (`easel <stage> --shard K/N`) does its share of the stage's per-item work into the
stage's own content-addressed cache (the image store, the inspection cache, the caption journal,
the generated-image cache) and writes no stage output. The DVC stage that runs afterwards finds
every item cached and writes the outputs: the merge. So a sharded run and a single-process run
write the same outputs, and a shard that dies is simply run again.

Shares are equal by count: every shard lists the same items (they all read the same inputs) and
takes every N-th of them (`share`), then does those not done yet. Items (URLs, files) are dealt in
the order of a stable hash of their key, so shares differ by at most one item, whatever the
inputs' order. Work done in batches (models) is dealt whole batches at a time, every item in the
batch, with the same neighbours, that a single-process run computes it in; shares differ by at
most one batch. As a share does not depend on what is done, shards started at different times
(by hand, on a shared folder) still cover everything once. In a flow, a validate shard is told its
files instead: the hand-out deals them along the archives download's shards handed back
(components.shard_exchange), so that no image goes through S3 twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

from components.plumbing.errors import EaselError

Shard = tuple[int, int]  # (K, N): shard K of N, 0 <= K < N
T = TypeVar("T")


def parse_shard(text: str) -> Shard:
    """`K/N` as given on the command line."""
    try:
        k, n = (int(x) for x in text.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        raise EaselError(f"--shard takes K/N with 0 <= K < N, e.g. 0/4; got {text!r}") from None
    return k, n


def stable_hash(key: str) -> int:
    """The same number for a key on every run, machine and Python version."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def shard_of(key: str, shards: int) -> int:
    """A key's shard when the whole set is not known (archives, read member by member)."""
    return stable_hash(key) % shards


def in_shard(key: str, shard: Shard | None) -> bool:
    return shard is None or shard_of(key, shard[1]) == shard[0]


def new_part_name(shard: int = 0) -> str:
    """A journal part file for one writer: parts sort in the order they were started."""
    return f"{time.time_ns():020d}-{os.getpid()}-{shard:04d}.jsonl"


def batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """`items` in batches of `batch_size`, in order."""
    return list(stream_batches(items, batch_size))


def stream_batches(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """`batches` of items that come one at a time (read in chunks): a batch may span chunks, so the
    batches are the same whatever the chunk size."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def share(items: Sequence[T], shard: Shard | None, key: Callable[[T], str] | None = None) -> list[T]:
    """Shard K's share of `items` (all of them without a shard): every N-th item, dealt in order, or
    in the order of the stable hash of `key(item)` when given. Given the same `items`, the shares
    cover them once and differ in length by at most one."""
    dealt = sorted(items, key=lambda item: stable_hash(key(item))) if key and shard is not None else items
    return list(stream_share(dealt, shard))


def contiguous_share(items: Sequence[T], shard: Shard) -> list[T]:
    """Shard K's share of `items` as one contiguous run: the runs cover them once, in order, and
    differ in length by at most one. For work whose neighbours share a cost (a model to load)."""
    k, n = shard
    return list(items[k * len(items) // n : (k + 1) * len(items) // n])


def stream_share(items: Iterable[T], shard: Shard | None) -> Iterator[T]:
    """`share` without a key, of items that come one at a time: every N-th, in order."""
    return iter(items) if shard is None else islice(items, shard[0], None, shard[1])


def deal(items: Iterable[T], shards: int) -> list[list[T]]:
    """Every shard's `stream_share` of `items` from one pass over them (a hand-out to N shards reads
    its table once, not N times): item i goes to shard i mod N."""
    dealt: list[list[T]] = [[] for _ in range(shards)]
    for i, item in enumerate(items):
        dealt[i % shards].append(item)
    return dealt
