"""Captioned images as SDXL training examples: aspect-ratio buckets, crops, captions.

Buckets (as in kohya's sd-scripts): sizes whose sides are multiples of `step`, within
[min_size, max_size], with about the target area resolution**2. Each image goes to the bucket of
nearest aspect ratio and is resized to cover it and cropped; a batch holds one bucket only.
With `no_upscale`, an image smaller than the target area keeps its own size (rounded down to
`step`) instead of being blown up.

SDXL is conditioned on each image's original size and on the top-left corner of the crop taken
from it. The corner is recorded in the resized image's coordinates, and mirrored when the image
is flipped, as the diffusers SDXL example does.

Captions: comma-separated parts; with `shuffle_caption`, the parts after the first `keep_tokens`
are shuffled each time the image is drawn; with probability `caption_dropout` the caption is
dropped (an unconditional example, which classifier-free guidance needs).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import BucketParams
from components.images import load_rgb


@dataclass(frozen=True)
class ImageCaption:
    path: Path
    caption: str
    sha256: str
    width: int
    height: int


def make_buckets(resolution: int, params: BucketParams) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution**2 pixels, both orientations."""
    if not params.enabled:
        return [(resolution, resolution)]
    area = resolution * resolution
    buckets = set()
    width = params.min_size
    while width <= params.max_size:
        height = min(params.max_size, (area // width) // params.step * params.step)
        if height >= params.min_size:
            buckets.add((width, height))  # sweeping every width covers both orientations
        width += params.step
    buckets.add((resolution, resolution))
    return sorted(buckets)


def assign_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], params: BucketParams, resolution: int
) -> tuple[int, int]:
    """The bucket an image trains in: nearest aspect ratio (or its own size, with no_upscale)."""
    if params.enabled and params.no_upscale and width * height <= resolution * resolution:
        step = params.step
        return max(step, width // step * step), max(step, height // step * step)
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover (width, height), crop it, maybe flip. Returns (image, (top, left))."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.BICUBIC)
    if center_crop:
        top, left = (resized[1] - height) // 2, (resized[0] - width) // 2
    else:
        top, left = rng.randint(0, resized[1] - height), rng.randint(0, resized[0] - width)
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = resized[0] - left - width  # the crop corner, seen in the mirrored picture
    return image, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def process_caption(caption: str, shuffle: bool, keep_tokens: int, dropout: float, rng: random.Random) -> str:
    """Shuffle the parts after the first keep_tokens; drop the whole caption with p = dropout."""
    if dropout and rng.random() < dropout:
        return ""
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    if shuffle:
        head, tail = parts[:keep_tokens], parts[keep_tokens:]
        rng.shuffle(tail)
        parts = head + tail
    return ", ".join(parts)


class CaptionedImages(torch.utils.data.Dataset):
    """Keys are (epoch, index); every random choice comes from (seed, epoch, index), so a resumed
    run draws exactly what an uninterrupted one would."""

    def __init__(
        self,
        items: list[ImageCaption],
        buckets: list[tuple[int, int]],
        bucket_of: list[tuple[int, int]],
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_dropout: float = 0.0,
        seed: int = 0,
        latents=None,  # a LatentCache, when latents are cached
    ) -> None:
        self.items = items
        self.buckets = buckets
        self.bucket_of = bucket_of
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.latents = latents

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        item = self.items[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        flip = self.random_flip and rng.random() < 0.5
        caption = process_caption(item.caption, self.shuffle_caption, self.keep_tokens, self.caption_dropout, rng)
        size = self.bucket_of[index]
        example = {"caption": caption, "original_size": (item.height, item.width), "target_size": (size[1], size[0])}
        if self.latents is not None:
            latent, crop = self.latents.get(item, size, flip)
            return example | {"latents": latent, "crop_top_left": crop}
        image, crop = resize_and_crop(load_rgb(item.path), size, self.center_crop, flip, rng)
        return example | {"pixel_values": to_tensor(image), "crop_top_left": crop}


class BucketBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches of one bucket each, as (epoch, index) keys; the order depends only on (seed, epoch).

    The sampler is the one place that decides what each process draws, so accelerate's
    wrappers are not used. With several processes the epoch's batches are padded by repeating
    its first ones until they divide evenly (every process must take the same number of steps),
    and process r takes batches r, r + n, r + 2n, ... `set_position(epoch, skip)` starts an
    epoch after its first `skip` batches of this process, which is how a resumed run continues.
    The epoch travels in each key, so DataLoader worker processes need no notice of it."""

    def __init__(
        self, bucket_of: list[tuple[int, int]], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.bucket_of = bucket_of
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def all_batches(self) -> list[list[int]]:
        """Every process's batches of this epoch, in order, before sharding."""
        rng = random.Random(f"{self.seed}:batches:{self.epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.bucket_of):
            by_bucket[bucket].append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        padded = batches + batches[: (-len(batches)) % self.num_replicas]
        return padded

    def batches(self) -> list[list[int]]:
        """This process's batches of this epoch."""
        return self.all_batches()[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches()[self.skip :]:
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        """Batches per epoch for one process (before any skip)."""
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for bucket in self.bucket_of:
            counts[bucket] += 1
        total = sum(math.ceil(n / self.batch_size) for n in counts.values())
        return math.ceil(total / self.num_replicas)


def collate(batch: list[dict]) -> dict:
    out = {
        "captions": [b["caption"] for b in batch],
        "original_sizes": [b["original_size"] for b in batch],
        "crop_top_lefts": [b["crop_top_left"] for b in batch],
        "target_sizes": [b["target_size"] for b in batch],
    }
    key = "latents" if "latents" in batch[0] else "pixel_values"
    out[key] = torch.stack([b[key] for b in batch])
    return out
