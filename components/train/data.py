"""Captioned images as SDXL training examples.

SDXL is conditioned on each image's original size and on the top-left corner of the crop taken
from it (the "micro-conditioning" of the SDXL paper). The crop corner is recorded in the
coordinates of the resized image, and mirrored when the image is flipped, as the diffusers SDXL
example does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.images import load_rgb


@dataclass(frozen=True)
class ImageCaption:
    path: Path
    caption: str
    sha256: str


def resize_and_crop(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to `resolution`, crop a square, maybe flip. Returns (image, (top, left))."""
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    if center_crop:
        top = (image.height - resolution) // 2
        left = (image.width - resolution) // 2
    else:
        top = rng.randint(0, image.height - resolution)
        left = rng.randint(0, image.width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        # The crop corner, seen in the mirrored picture.
        left = size[0] - left - resolution
    return image, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CaptionedImages(torch.utils.data.Dataset):
    def __init__(
        self,
        items: list[ImageCaption],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.items = items
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image = load_rgb(item.path)
        original_size = (image.height, image.width)
        # A per-example RNG: the same crop/flip for the same (seed, index) in every worker.
        rng = random.Random(f"{self.seed}:{index}")
        flip = self.random_flip and rng.random() < 0.5
        image, crop_top_left = resize_and_crop(image, self.resolution, self.center_crop, flip, rng)
        return {
            "pixel_values": to_tensor(image),
            "caption": item.caption,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
        }


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "original_sizes": [b["original_size"] for b in batch],
        "crop_top_lefts": [b["crop_top_left"] for b in batch],
    }
