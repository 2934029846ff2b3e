"""The BLIP-family captioner (transformers): batched generation on whatever device exists."""

from __future__ import annotations

import hashlib
import json

import torch

from components.config import BlipParams, ModelsParams


class BlipCaptioner:
    name = "blip"

    def __init__(self, models: ModelsParams, params: BlipParams, dtype: torch.dtype, device: torch.device) -> None:
        self.models = models
        self.params = params
        self.dtype = dtype
        self.device = device
        self._model = None
        self._processor = None

    @property
    def key(self) -> str:
        """Identifies this captioner's output: a change to any of these recomputes its column."""
        config = {"model": self.models.blip, "revision": self.models.revision, **self.params.model_dump()}
        config.pop("enabled")
        return "blip-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]

    def _load(self) -> None:
        if self._model is None:
            from components.models.loaders import load_blip

            self._model, self._processor = load_blip(self.models, self.dtype, self.device)

    @torch.inference_mode()
    def __call__(self, images: list) -> list[str]:
        self._load()
        prompt = self.params.prompt
        inputs = self._processor(
            images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt"
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        ids = self._model.generate(**inputs, max_new_tokens=self.params.max_new_tokens, num_beams=self.params.num_beams)
        return [text.strip() for text in self._processor.batch_decode(ids, skip_special_tokens=True)]
