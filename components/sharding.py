"""Shards: how a heavy stage's work is split over processes or machines, the same way everywhere.

A shard run (`easel <stage> --shard K/N`) does its share of the stage's per-item work into the
stage's own content-addressed cache (the image store, the inspection cache, the caption journal,
the generated-image cache) and writes no stage output. The DVC stage that runs afterwards finds
every item cached and writes the outputs: the merge. So a sharded run and a single-process run
write the same outputs, and a shard that dies is simply run again.

Items go to shards by a stable hash of their key (URL, file sha256). Work done in batches (models)
is shared out whole batches at a time, batch i to shard i mod N, so that every item is computed
in the same batch, with the same neighbours, as a single-process run computes it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from typing import TypeVar

from components.errors import EaselError

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


def shard_of(key: str, shards: int) -> int:
    """A key's shard: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % shards


def in_shard(key: str, shard: Shard | None) -> bool:
    return shard is None or shard_of(key, shard[1]) == shard[0]


def new_part_name(shard: int = 0) -> str:
    """A journal part file for one writer: parts sort in the order they were started."""
    return f"{time.time_ns():020d}-{os.getpid()}-{shard:04d}.jsonl"


def batches(items: Sequence[T], batch_size: int, shard: Shard | None = None) -> list[list[T]]:
    """`items` in batches of `batch_size`, in order; with a shard, only that shard's batches."""
    every = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return every if shard is None else every[shard[0] :: shard[1]]
