"""SDXL base 1.0 at full size with random weights, written where `from_pretrained` finds the real one.

The Hugging Face cache layout under its real repo id, read with HF_HUB_OFFLINE=1:
`$HF_HUB_CACHE/models--stabilityai--stable-diffusion-xl-base-1.0/refs/main` names a snapshot, whose
files are links into `blobs/` (named by sha256). Written: model_index.json, scheduler/, tokenizer/,
tokenizer_2/, and unet/, vae/, text_encoder/, text_encoder_2/ with their configs and weights in fp32
plus the `fp16` variant the real repository ships. Not written: the single-file checkpoints at the
repository's root (sd_xl_base_1.0*.safetensors), which `from_pretrained` does not read. The snapshot's
commit hash is Easel's own (a hash of this module's name), not the hub's.

Where the architecture comes from (checked, not remembered):
- U-Net and VAE: Stability's `configs/inference/sd_xl_base.yaml` (github.com/Stability-AI/
  generative-models), turned into diffusers configs by diffusers' own single-file converter
  (`create_unet_diffusers_config_from_ldm`, `create_vae_diffusers_config_from_ldm`): 2,567,463,684
  and 83,653,863 parameters.
- Text encoders: open_clip's ViT-L-14 and ViT-bigG-14 `text_cfg` (width 768/1280, heads 12/20,
  layers 12/32, 77 tokens, 49,408 words; quick_gelu for OpenAI's, gelu for bigG; MLP 4x), with the
  token ids SDXL's configs carry (bos 0, eos 2, pad 1): 123,060,480 and 694,659,840 parameters.
- Scheduler: diffusers' SDXL single-file default (Euler, scaled_linear 0.00085-0.012, leading
  spacing, steps_offset 1), which is what the yaml's LegacyDDPMDiscretization describes.
- Tokenizers: CLIP's BPE from open_clip (Easel's `save_clip_tokenizer`), pad `<|endoftext|>` and `!`.

The weights are torch's default initialisation of every layer, drawn and written one layer at a
time, so a 10 GB file is written with a few hundred MB of memory. This is a minimal writer for the
SDXL pipeline only (the rehearsal's need); a general hub-cache builder belongs in components.models.

    .venv/bin/python -m benchmarks.sdxl_hub_cache --cache .easel/rehearsal/hub
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
from pathlib import Path

import torch

REPO_ID = "stabilityai/stable-diffusion-xl-base-1.0"
COMMIT = hashlib.sha1(__name__.encode()).hexdigest()

UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
}
VAE_CONFIG = {
    "sample_size": 1024,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 4,
    "layers_per_block": 2,
    "scaling_factor": 0.13025,
}
TEXT_CONFIGS = {
    "text_encoder": {"hidden_size": 768, "heads": 12, "layers": 12, "act": "quick_gelu"},
    "text_encoder_2": {"hidden_size": 1280, "heads": 20, "layers": 32, "act": "gelu"},
}
SCHEDULER_CONFIG = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def text_config(name: str):
    from transformers import CLIPTextConfig

    c = TEXT_CONFIGS[name]
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=c["hidden_size"],
        intermediate_size=4 * c["hidden_size"],
        num_attention_heads=c["heads"],
        num_hidden_layers=c["layers"],
        max_position_embeddings=77,
        hidden_act=c["act"],
        projection_dim=c["hidden_size"],
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def meta_models() -> dict[str, torch.nn.Module]:
    """Every trainable part on the meta device: shapes and configs, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "vae": AutoencoderKL(**VAE_CONFIG),
            "text_encoder": CLIPTextModel(text_config("text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(text_config("text_encoder_2")),
        }
    models["text_encoder"].config.architectures = ["CLIPTextModel"]
    models["text_encoder_2"].config.architectures = ["CLIPTextModelWithProjection"]
    return models


def stream_safetensors(model: torch.nn.Module, path: Path, dtypes: list[torch.dtype], seed: int) -> list[Path]:
    """Write the model's state dict as one safetensors file per dtype, initialising one layer at a
    time (torch's reset_parameters, or N(0, 0.02) for a layer without one) and freeing it after."""
    state = model.state_dict()
    owners = {key: key.rpartition(".")[0] for key in state}
    outs = []
    for dtype in dtypes:
        header, offset = {}, 0
        for key, tensor in state.items():
            size = tensor.numel() * dtype.itemsize
            header[key] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        target = (
            path
            if dtype == torch.float32
            else path.with_suffix(f".{'fp16' if dtype == torch.float16 else 'bf16'}.safetensors")
        )
        outs.append(target)
        with open(target, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            torch.manual_seed(seed)  # the same draws for every dtype: the variants are one model
            current = None
            for key in state:
                name = owners[key]
                module = model.get_submodule(name) if name else model
                if module is not current:
                    if current is not None:
                        current.to_empty(device="meta", recurse=False)
                    module.to_empty(device="cpu", recurse=False)
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                    else:
                        for tensor in module.parameters(recurse=False):
                            torch.nn.init.normal_(tensor, std=0.02)
                    current = module
                value = getattr(module, key.rpartition(".")[2]).detach()
                out.write(value.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            if current is not None:
                current.to_empty(device="meta", recurse=False)
    return outs


def link_into_blobs(snapshot: Path, blobs: Path) -> None:
    """Move each file into blobs/<sha256> and leave a relative link, as huggingface_hub does."""
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file() and not p.is_symlink()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        blob = blobs / digest.hexdigest()
        path.replace(blob)
        path.symlink_to(os.path.relpath(blob, path.parent))


def write_sdxl_base(cache: Path, seed: int = 0, weights: bool = True) -> Path:
    """Write the repository into the hub cache `cache` (once); returns its snapshot folder. Without
    `weights`, only the configs and tokenizers (what `easel train --plan` reads), in seconds."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from components.models.tokenizers import save_clip_tokenizer

    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    if (repo / "refs" / "main").is_file():
        return snapshot
    models = meta_models()
    for index, (name, model) in enumerate(models.items()):
        folder = snapshot / name
        folder.mkdir(parents=True, exist_ok=True)
        (model.config.save_pretrained if name.startswith("text") else model.save_config)(str(folder))
        if weights:
            filename = "model.safetensors" if name.startswith("text") else "diffusion_pytorch_model.safetensors"
            stream_safetensors(model, folder / filename, [torch.float32, torch.float16], seed + index)
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        save_clip_tokenizer(snapshot / name, pad_token=pad)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.save_config(str(snapshot / "scheduler"))
    pipe = StableDiffusionXLPipeline(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(str(snapshot / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(snapshot / "tokenizer_2")),
        scheduler=scheduler,
    )
    pipe.save_config(str(snapshot))  # model_index.json
    link_into_blobs(snapshot, repo / "blobs")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".easel/rehearsal/hub"))
    parser.add_argument("--configs-only", action="store_true", help="no weights: what `easel train --plan` reads")
    args = parser.parse_args()
    print(write_sdxl_base(args.cache, weights=not args.configs_only))


if __name__ == "__main__":
    main()
