"""The LAION aesthetic predictor v2 (improved-aesthetic-predictor): an MLP on CLIP image embeddings.

Architecture of `sac+logos+ava1-l14-linearMSE.pth`: Linear(D,1024) Dropout(0.2) Linear(1024,128)
Dropout(0.2) Linear(128,64) Dropout(0.1) Linear(64,16) Linear(16,1), no activations, applied to the
L2-normalised CLIP image embedding (D = 768 for OpenAI ViT-L/14). Scores sit on a 1-10 scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from components.plumbing.errors import EaselError

HIDDEN = (1024, 128, 64, 16)
DROPOUT = (0.2, 0.2, 0.1, 0.0)


class AestheticMLP(nn.Module):
    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        # The same Sequential indices as the published file (layers.0, .2, .4, .6, .7).
        self.layers = nn.Sequential(
            nn.Linear(input_size, HIDDEN[0]),
            nn.Dropout(DROPOUT[0]),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            nn.Dropout(DROPOUT[1]),
            nn.Linear(HIDDEN[1], HIDDEN[2]),
            nn.Dropout(DROPOUT[2]),
            nn.Linear(HIDDEN[2], HIDDEN[3]),
            nn.Linear(HIDDEN[3], 1),
        )

    def forward(self, normalized_embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(normalized_embedding).squeeze(-1)


def _expected_shapes(input_size: int) -> dict[str, tuple[int, ...]]:
    widths = (input_size, *HIDDEN, 1)
    indices = (0, 2, 4, 6, 7)
    shapes = {}
    for i, idx in enumerate(indices):
        shapes[f"layers.{idx}.weight"] = (widths[i + 1], widths[i])
        shapes[f"layers.{idx}.bias"] = (widths[i + 1],)
    return shapes


def load_aesthetic_mlp(path: Path | str, expected_input: int | None = None, sha256: str | None = None) -> AestheticMLP:
    """Load the MLP safely and check every tensor's shape.

    A .safetensors file is read as is. A pickle (LAION's own .pth) is read only when `sha256` pins its
    content, and then with torch's weights-only loader: no file can choose what runs.
    `expected_input` is the CLIP embedding width; a mismatch (e.g. ViT-B-32 weights with an
    L/14 predictor) is an error, not a silently wrong score.
    """
    from components.plumbing.fsutil import sha256_file

    path = Path(path)
    if not path.is_file():
        raise EaselError(f"aesthetic weights {path}: file not found")
    if path.suffix != ".safetensors":
        if not sha256:
            raise EaselError(
                f"aesthetic weights {path}: a pickle file is read only when models.aesthetic_sha256 pins its "
                "content; pin the published file's sha256, or convert it to .safetensors"
            )
        if (got := sha256_file(path)) != sha256:
            raise EaselError(f"aesthetic weights {path}: sha256 {got} is not the pinned {sha256}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EaselError(f"aesthetic weights {path}: cannot be loaded safely: {exc}") from None
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise EaselError(f"aesthetic weights {path}: not a LAION aesthetic MLP state dict (no layers.0.weight)")
    input_size = int(state["layers.0.weight"].shape[1])
    if expected_input is not None and input_size != expected_input:
        raise EaselError(
            f"aesthetic weights {path}: expect {input_size}-d CLIP embeddings but the CLIP model "
            f"gives {expected_input}-d; pair the predictor with the CLIP model it was trained on"
        )
    expected = _expected_shapes(input_size)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))
        raise EaselError(f"aesthetic weights {path}: architecture mismatch: {diff[:6]}")
    model = AestheticMLP(input_size)
    model.load_state_dict(state)
    return model.eval()
