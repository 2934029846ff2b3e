"""A tiny model set, randomly initialised with a fixed seed, in the real on-disk formats.

No model hub is reachable offline, so tests and the demo build these and load them through the
same code as the real models (`from_pretrained`, open_clip's `local-dir:`, the aesthetic loader):

- `sdxl/`: a diffusers StableDiffusionXLPipeline folder (U-Net with SDXL's text_time conditioning,
  two CLIP text encoders, an 8x VAE, Euler scheduler, CLIP BPE tokenizers);
- `blip/`: BlipForConditionalGeneration + BlipProcessor (word-piece vocab built from CLIP's BPE);
- `tagger/`: a WD-style multi-label tagger (timm ViT folder + selected_tags.csv);
- `open_clip/`: an open_clip model folder (open_clip_config.json + open_clip_model.safetensors);
- `aesthetic/aesthetic_mlp.safetensors`: the LAION aesthetic MLP, input width matched to the tiny CLIP.

The outputs are meaningless pictures and captions; everything around them is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.models.aesthetic import AestheticMLP
from components.models.tokenizers import (
    CLIP_CONTEXT_LENGTH,
    CLIP_VOCAB_SIZE,
    save_clip_tokenizer,
    save_wordpiece_vocab,
)
from components.plumbing.fsutil import atomic_dir, atomic_write_json

# Bump when the tiny architectures change, so stale builds are rebuilt.
TINY_VERSION = 3
MARKER = "tiny-models.json"
CLIP_EMBED_DIM = 32
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# SDXL base 1.0's scheduler settings (EulerDiscreteScheduler).
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _text_encoder_config(projection: bool):
    from transformers import CLIPTextConfig

    # Token ids mirror SDXL's real text encoder configs (bos 0 / eos 2 / pad 1 is what they ship;
    # eos 2 makes transformers pool at the highest token id, i.e. at <|endoftext|>).
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        hidden_act="quick_gelu" if not projection else "gelu",
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text_encoder_2 + 6 time ids
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),  # four blocks: the same 8x downsampling as SDXL's VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_encoder_config(projection=False))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(projection=True))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    save_clip_tokenizer(out_dir / "_tok1", pad_token="<|endoftext|>")
    save_clip_tokenizer(out_dir / "_tok2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir / "_tok1"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(out_dir / "_tok2"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    for tmp in ("_tok1", "_tok2"):
        for f in (out_dir / tmp).iterdir():
            f.unlink()
        (out_dir / tmp).rmdir()


def build_tiny_blip(out_dir: Path, seed: int = 0) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "_vocab.txt"
    save_wordpiece_vocab(vocab_file)
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=512)
    # BLIP's decoder starts from [DEC] and stops at [SEP], as in Salesforce's checkpoints.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    image_size = 64
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(
            size={"height": image_size, "width": image_size}, image_mean=OPENAI_MEAN, image_std=OPENAI_STD
        ),
        tokenizer=tokenizer,
    )
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 16,
            "initializer_range": 0.02,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    vocab_file.unlink()


def tiny_open_clip_config() -> dict:
    return {
        "model_cfg": {
            "embed_dim": CLIP_EMBED_DIM,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
            "text_cfg": {
                "context_length": CLIP_CONTEXT_LENGTH,
                "vocab_size": CLIP_VOCAB_SIZE,
                "width": 64,
                "heads": 2,
                "layers": 2,
            },
        },
        # OpenAI CLIP's preprocessing, as used with ViT-L-14-quickgelu/openai.
        "preprocess_cfg": {
            "size": 224,
            "mode": "RGB",
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def build_tiny_open_clip(out_dir: Path, seed: int = 0) -> None:
    import open_clip
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config()
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"])
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))


def build_tiny_aesthetic(out_path: Path, input_size: int = CLIP_EMBED_DIM, seed: int = 0) -> None:
    from safetensors.torch import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AestheticMLP(input_size)
    # The state dict of sac+logos+ava1-l14-linearMSE.pth, in safetensors (a .pth is a pickle).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_path))


TAGGER_SIZE = 64
RATING_TAGS = ("general", "sensitive", "questionable", "explicit")
CHARACTER_TAGS = ("hatsune_miku", "kirby", "pikachu", "mario_(mario)")


def build_tiny_tagger(out_dir: Path, seed: int = 0) -> None:
    """A WD-style tagger: a timm ViT folder (config.json + model.safetensors, what `local-dir:`
    and the hub load) and its selected_tags.csv (tag_id, name, category, count)."""
    import csv

    import timm
    from safetensors.torch import save_file

    from components.models.tokenizers import clip_words

    out_dir.mkdir(parents=True, exist_ok=True)
    # Categories as in SmilingWolf's tag lists: 9 rating, 0 general, 4 character.
    general = [w if i % 7 else f"{w}_{clip_words(400)[i + 1]}" for i, w in enumerate(clip_words(300))]
    tags = [(t, 9) for t in RATING_TAGS] + [(t, 0) for t in general] + [(t, 4) for t in CHARACTER_TAGS]
    model_args = {
        "img_size": TAGGER_SIZE,
        "patch_size": 16,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,
    }
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=len(tags), **model_args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    config = {
        "architecture": "vit_base_patch16_224",
        "num_classes": len(tags),
        "num_features": 32,
        "global_pool": "avg",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, TAGGER_SIZE, TAGGER_SIZE],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": len(tags),
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    with open(out_dir / "selected_tags.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(tags):
            writer.writerow([i, name, category, 1000 - i])


def tiny_models_ready(root: Path) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def build_tiny_models(root: Path | str, seed: int = 0, force: bool = False) -> Path:
    """Build the tiny model set under `root` (idempotent; atomic: all or nothing)."""
    root = Path(root)
    if tiny_models_ready(root) and not force:
        return root
    with atomic_dir(root) as tmp:
        build_tiny_sdxl(tmp / "sdxl", seed)
        build_tiny_blip(tmp / "blip", seed)
        build_tiny_tagger(tmp / "tagger", seed)
        build_tiny_open_clip(tmp / "open_clip", seed)
        build_tiny_aesthetic(tmp / "aesthetic" / "aesthetic_mlp.safetensors", CLIP_EMBED_DIM, seed)
        atomic_write_json(
            tmp / MARKER,
            {
                "version": TINY_VERSION,
                "seed": seed,
                "note": "Randomly initialised tiny models for offline tests and demos. Not for real use.",
                "models": ["sdxl", "blip", "tagger", "open_clip", "aesthetic/aesthetic_mlp.safetensors"],
            },
        )
    return root
