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
    """Items are indices; every random choice comes from (seed, epoch, index), so a resumed run
    draws exactly what an uninterrupted one would."""

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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        rng = self.rng(index)
        flip = self.random_flip and rng.random() < 0.5
        caption = process_caption(item.caption, self.shuffle_caption, self.keep_tokens, self.caption_dropout, rng)
        size = self.bucket_of[index]
        example = {"caption": caption, "original_size": (item.height, item.width), "target_size": (size[1], size[0])}
        if self.latents is not None:
            latent, crop = self.latents.get(item, size, flip)
            return example | {"latents": latent, "crop_top_left": crop}
        image, crop = resize_and_crop(load_rgb(item.path), size, self.center_crop, flip, rng)
        return example | {"pixel_values": to_tensor(image), "crop_top_left": crop}


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one bucket each; the order depends only on (seed, epoch)."""

    def __init__(self, bucket_of: list[tuple[int, int]], batch_size: int, seed: int) -> None:
        self.bucket_of = bucket_of
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
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
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for bucket in self.bucket_of:
            counts[bucket] += 1
        return sum(math.ceil(n / self.batch_size) for n in counts.values())


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
