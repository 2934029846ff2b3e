"""On-disk caches that take the frozen VAE and text encoders out of the training loop.

Latents: the VAE's latent distribution (mean and std) of each image's crop, keyed by the image's
sha256, the VAE's identity, the bucket size and whether it is flipped; training samples from it
each step, as the uncached loop does. Text embeddings: both encoders' outputs for a caption,
keyed by the caption and the encoders' identity. Files are safetensors, written atomically; a file
that is not a whole safetensors file (cut short, or replaced by anything else) is encoded again,
never read.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from components.images import load_rgb
from components.plumbing.errors import EaselError
from components.plumbing.tensor_tree import check_safetensors
from components.train.data import ImageCaption, resize_and_crop, to_tensor


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def _cached(path: Path) -> bool:
    """A whole safetensors file is there (its header read, not its tensors)."""
    try:
        check_safetensors(path)
    except (EaselError, OSError):
        return False
    return True


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{random.getrandbits(32):08x}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


class MemoryTier:
    """Loaded cache files kept in RAM up to a byte budget, so each is read from disk once.

    Entries are never evicted: once the budget is spent, further files are read from disk every
    time (an epoch touches every file, so an LRU would only churn)."""

    def __init__(self, budget_mb: int) -> None:
        self.budget = budget_mb * 2**20
        self.used = 0
        self.entries: dict[Path, dict[str, torch.Tensor]] = {}

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        if path in self.entries:
            return self.entries[path]
        tensors = load_file(str(path))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.used + size <= self.budget:
            self.entries[path] = tensors
            self.used += size
        return tensors


class LatentCache:
    def __init__(self, root: Path, vae_identity: str, memory_mb: int = 0) -> None:
        self.root = root / "latents"
        self.vae_identity = vae_identity
        self.memory = MemoryTier(memory_mb)

    def path(self, item: ImageCaption, size: tuple[int, int], flip: bool) -> Path:
        key = _digest(item.sha256, self.vae_identity, f"{size[0]}x{size[1]}", flip)
        return self.root / key[:2] / f"{key}.safetensors"

    def prepare(self, vae, items, bucket_of, flips: tuple[bool, ...], device, progress: bool = True) -> int:
        """Encode every (image, flip) not cached yet; returns how many were encoded."""
        todo = [(i, f) for i, item in enumerate(items) for f in flips if not _cached(self.path(item, bucket_of[i], f))]
        for index, flip in tqdm(todo, desc="cache latents", unit="img", disable=not progress):
            item, size = items[index], bucket_of[index]
            image, crop = resize_and_crop(load_rgb(item.path), size, True, flip, random.Random(0))
            with torch.no_grad():
                dist = vae.encode(to_tensor(image).unsqueeze(0).to(device, vae.dtype)).latent_dist
            _save(
                self.path(item, size, flip),
                {"mean": dist.mean[0].float(), "std": dist.std[0].float(), "crop": torch.tensor(crop)},
            )
        return len(todo)

    def get(self, item: ImageCaption, size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """The cached distribution's (mean, std) stacked, and the crop corner it was taken at."""
        tensors = self.memory.load(self.path(item, size, flip))
        crop = tuple(int(v) for v in tensors["crop"])
        return torch.stack([tensors["mean"], tensors["std"]]), crop


class TextEmbeddingCache:
    def __init__(self, root: Path, encoders_identity: str, memory_mb: int = 0) -> None:
        self.root = root / "text"
        self.identity = encoders_identity
        self.memory = MemoryTier(memory_mb)

    def path(self, caption: str) -> Path:
        key = _digest(caption, self.identity)
        return self.root / key[:2] / f"{key}.safetensors"

    def prepare(self, captions: list[str], encode, progress: bool = True) -> int:
        todo = sorted({c for c in captions if not _cached(self.path(c))})
        for caption in tqdm(todo, desc="cache text embeddings", unit="caption", disable=not progress):
            with torch.no_grad():
                prompt_embeds, pooled = encode([caption])
            _save(self.path(caption), {"prompt_embeds": prompt_embeds[0].float(), "pooled": pooled[0].float()})
        return len(todo)

    def get(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = [self.memory.load(self.path(c)) for c in captions]
        return torch.stack([t["prompt_embeds"] for t in loaded]), torch.stack([t["pooled"] for t in loaded])


def folder_identity(ref: str) -> str:
    """A model folder's (or single-file checkpoint's) content fingerprint, or a hub reference as given."""
    path = Path(ref)
    if path.is_dir():
        from components.plumbing.fsutil import model_fingerprint

        return "sha256:" + model_fingerprint(path)
    if path.is_file():
        from components.plumbing.fsutil import sha256_file

        return "sha256:" + sha256_file(path)
    return f"hub:{ref}"
