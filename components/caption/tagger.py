"""A WD-style ("waifu diffusion") multi-label tagger: a timm image model and its tag list.

SmilingWolf's taggers (e.g. `SmilingWolf/wd-vit-tagger-v3`) are timm models on the hub with a
`selected_tags.csv` (tag_id, name, category, count); categories: 0 general, 4 character,
9 rating. Images are padded to a white square, resized, channel order BGR, normalised with the
model's own mean and std; a sigmoid per tag gives its probability.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import ModelsParams, TaggerParams
from components.plumbing.errors import EaselError

GENERAL, CHARACTER, RATING = 0, 4, 9
# Probabilities at or above this are cached (a real tag list has ~10,000 tags); thresholds may
# then change without running the model again, as long as they stay at or above it.
STORE_FLOOR = 0.05


def _tags_file(ref: str, is_local: bool) -> Path:
    if is_local:
        return Path(ref) / "selected_tags.csv"
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref, "selected_tags.csv"))


def read_tags(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return [r["name"] for r in rows], np.array([int(r["category"]) for r in rows])
    except (OSError, KeyError, ValueError) as exc:
        raise EaselError(f"{path}: not a tagger tag list (tag_id, name, category, count): {exc}") from None


def pad_to_square(image: Image.Image) -> Image.Image:
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class WDTagger:
    name = "tagger"

    def __init__(self, models: ModelsParams, params: TaggerParams, dtype: torch.dtype, device: torch.device) -> None:
        self.models = models
        self.params = params
        self.dtype = dtype
        self.device = device
        self._model = None

    @property
    def key(self) -> str:
        # Thresholds, exclusions and limits are applied when merging, from the stored
        # probabilities: changing them recomputes nothing. Only the model defines this column.
        return "tagger-" + hashlib.sha256(json.dumps({"model": self.models.tagger}).encode()).hexdigest()[:12]

    def _load(self) -> None:
        if self._model is not None:
            return
        import timm
        from timm.data import create_transform, resolve_data_config

        from components.models.loaders import require_hub_safetensors, require_safetensors, resolve_ref

        self.models.require("tagger")
        ref = resolve_ref(self.models.tagger, "tagger")
        is_local = Path(ref).is_dir()
        if is_local:
            require_safetensors(ref, "model.safetensors", "tagger")
        else:
            require_hub_safetensors(ref, "model.safetensors", "tagger")
        try:
            model = timm.create_model(("local-dir:" if is_local else "hf-hub:") + ref, pretrained=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise EaselError(f"cannot load models.tagger = {self.models.tagger!r}: {exc}") from None
        self.tags, self.categories = read_tags(_tags_file(ref, is_local))
        if len(self.tags) != model.num_classes:
            raise EaselError(f"models.tagger: {len(self.tags)} tags in selected_tags.csv, {model.num_classes} outputs")
        self._transform = create_transform(**resolve_data_config({}, model=model))
        self._model = model.to(self.device, self.dtype).eval()

    @torch.inference_mode()
    def __call__(self, images: list) -> list[list[tuple[str, float, int]]]:
        """Per image: (name, probability, category) of every tag at or above STORE_FLOOR, and every
        rating tag."""
        self._load()
        batch = torch.stack([self._transform(pad_to_square(im.convert("RGB"))) for im in images])
        batch = batch[:, [2, 1, 0]]  # WD taggers were trained on BGR input
        probs = torch.sigmoid(self._model(batch.to(self.device, self.dtype)).float()).cpu().numpy()
        keep = [(probs[i] >= STORE_FLOOR) | (self.categories == RATING) for i in range(len(probs))]
        return [
            [(self.tags[j], round(float(row[j]), 4), int(self.categories[j])) for j in np.flatnonzero(mask)]
            for row, mask in zip(probs, keep, strict=True)
        ]


def select_tags(scored: list, params: TaggerParams) -> list[str]:
    """The tags to write: above their category's threshold, most confident first, raw names."""
    rating = [t for t in scored if t[2] == RATING]
    chosen = [
        t
        for t in scored
        if (t[2] == GENERAL and t[1] >= params.general_threshold)
        or (t[2] == CHARACTER and t[1] >= params.character_threshold)
    ]
    chosen.sort(key=lambda t: -t[1])
    names = [t[0] for t in chosen]
    if params.include_rating and rating:
        names.insert(0, max(rating, key=lambda t: t[1])[0])
    return names
