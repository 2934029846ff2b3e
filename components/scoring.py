"""Image scoring: CLIP score and the LAION aesthetic score from one image-embedding pass.

One open_clip image embedding per image serves both metrics (the guide's loop encoded each
image twice). Used by evaluate (generated images) and by validate's optional curation (training
images): one implementation.

Definitions, stated in every report:
- CLIP score: the cosine similarity of the L2-normalised open_clip image and text embeddings,
  in [-1, 1] (not torchmetrics' 100 * max(cos, 0)); prompts are truncated to CLIP's 77 tokens.
- Aesthetic score: the LAION aesthetic predictor v2 MLP applied to the L2-normalised image
  embedding (1-10 scale for the real weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.config import ModelsParams
from components.images import load_rgb
from components.models.aesthetic import load_aesthetic_mlp
from components.models.loaders import aesthetic_weights_path, default_device, load_open_clip

CLIP_SCORE_DEFINITION = (
    "CLIP score = cosine similarity of the L2-normalised open_clip image and text embeddings "
    "(range -1 to 1, not scaled by 100); prompts truncated to 77 tokens"
)
AESTHETIC_DEFINITION = "aesthetic score = LAION aesthetic predictor v2 MLP on the L2-normalised CLIP image embedding"


class _PreprocessedImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path | str], preprocess) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.paths[index]))


class ImageTextScorer:
    def __init__(
        self, models: ModelsParams, device: torch.device | None = None, batch_size: int = 16, workers: int = 2
    ) -> None:
        self.device = device or default_device()
        self.batch_size = batch_size
        self.workers = workers
        self.clip, self.preprocess, self.tokenizer = load_open_clip(models, self.device)
        embed_dim = self._embed_dim()
        self.aesthetic = load_aesthetic_mlp(
            aesthetic_weights_path(models), expected_input=embed_dim, sha256=models.aesthetic_sha256
        ).to(self.device)
        self.model_name = models.clip_model + (f"/{models.clip_pretrained}" if models.clip_pretrained else "")

    def _embed_dim(self) -> int:
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *self._image_size(), device=self.device)
            return int(self.clip.encode_image(probe).shape[-1])

    def _image_size(self) -> tuple[int, int]:
        size = self.clip.visual.image_size
        return tuple(size) if isinstance(size, list | tuple) else (size, size)

    @torch.inference_mode()
    def embed_images(self, paths: Sequence[Path | str], progress: bool = False) -> torch.Tensor:
        """L2-normalised image embeddings, batched. DataLoader workers decode and preprocess the
        next batches while the encoder runs, so decoding does not add to the encoder's time."""
        loader = torch.utils.data.DataLoader(
            _PreprocessedImages(list(paths), self.preprocess),
            batch_size=self.batch_size,
            num_workers=self.workers if len(paths) > self.batch_size else 0,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers and len(paths) > self.batch_size else None,
        )
        chunks = []
        with tqdm(total=len(paths), desc="score", unit="img", disable=not progress) as bar:
            for batch in loader:
                chunks.append(self.encode_batch(batch))
                bar.update(len(batch))
        return torch.cat(chunks) if chunks else torch.empty(0)

    @torch.inference_mode()
    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of already preprocessed images."""
        return F.normalize(self.clip.encode_image(pixels.to(self.device, non_blocking=True)).float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)  # truncates to the context length (77)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    @torch.inference_mode()
    def aesthetic_scores(self, image_embeddings: torch.Tensor) -> np.ndarray:
        return self.aesthetic(image_embeddings.to(self.device)).float().cpu().numpy()

    def score(
        self, paths: Sequence[Path | str], prompts: Sequence[str], progress: bool = False
    ) -> dict[str, np.ndarray]:
        """Both metrics for each (image, prompt) pair; each image is embedded once."""
        image_emb = self.embed_images(paths, progress)
        unique = list(dict.fromkeys(prompts))
        text_emb = self.embed_texts(unique)
        rows = torch.tensor([unique.index(p) for p in prompts], device=text_emb.device)
        clip = (image_emb.to(text_emb.device) * text_emb[rows]).sum(dim=-1).cpu().numpy()
        return {"clip_score": clip, "aesthetic_score": self.aesthetic_scores(image_emb)}
