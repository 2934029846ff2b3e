"""Caption stage speed on this machine: batched against one image at a time, same model, same run.

Models: the tiny BLIP and tagger (what the demo runs), and full-size architectures with random
weights (nothing to download): BLIP large's (ViT-L/16 at 384 px + a BERT-base text decoder) and a
WD-v3-style ViT-B/16 tagger at 448 px with 10,861 tags. Greedy decoding, 20 new tokens.

    .venv/bin/python -m benchmarks.caption_bench [--images 8] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.caption.blip import BlipCaptioner
from components.caption.tagger import WDTagger
from components.config import BlipParams, ModelsParams, TaggerParams


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (600, 480, 3), dtype=np.uint8)) for _ in range(count)]


def full_size_blip(folder: Path) -> Path:
    """BLIP large's architecture (Salesforce/blip-image-captioning-large), random weights, saved."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from components.models.tiny import build_tiny_blip

    build_tiny_blip(folder / "tok")  # for its tokenizer: vocabulary size barely matters to the cost
    processor = BlipProcessor.from_pretrained(str(folder / "tok"))
    processor.image_processor = BlipImageProcessor(size={"height": 384, "width": 384})
    tok = processor.tokenizer
    config = BlipConfig(
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 16,
        },
        text_config={
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.sep_token_id,
            "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
            "encoder_hidden_size": 1024,
        },
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(str(folder / "blip-large"))
    processor.save_pretrained(str(folder / "blip-large"))
    return folder / "blip-large"


def full_size_tagger(folder: Path) -> Path:
    """A WD-v3-style tagger: timm ViT-B/16 at 448 px, 10,861 tags (SmilingWolf/wd-vit-tagger-v3's shape)."""
    import csv
    import json

    import timm
    from safetensors.torch import save_file

    out = folder / "tagger-vit-b"
    out.mkdir()
    tags = 10861
    args = {"img_size": 448, "class_token": False, "global_pool": "avg", "fc_norm": False}
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=tags, **args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_base_patch16_224",
                "num_classes": tags,
                "model_args": args,
                "pretrained_cfg": {
                    "input_size": [3, 448, 448],
                    "interpolation": "bicubic",
                    "crop_pct": 1.0,
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                    "num_classes": tags,
                },
            }
        )
    )
    with open(out / "selected_tags.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, f"tag_{i}", 0, 1] for i in range(tags))
    return out


def rate(captioner, batch: list[Image.Image], batch_size: int) -> float:
    captioner(batch[:1])  # load and warm up
    start = time.perf_counter()
    for i in range(0, len(batch), batch_size):
        captioner(batch[i : i + batch_size])
    return len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from components.models.loaders import TINY_ROOT
    from components.models.tiny import build_tiny_models

    build_tiny_models(TINY_ROOT)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device cpu"
    )
    batch = images(args.images)
    device, dtype = torch.device("cpu"), torch.float32
    blip_params = BlipParams(max_new_tokens=20, num_beams=1)
    with tempfile.TemporaryDirectory() as tmp:
        setups = [
            (
                "tiny BLIP",
                lambda: BlipCaptioner(ModelsParams(blip=str(TINY_ROOT / "blip")), blip_params, dtype, device),
            ),
            (
                "tiny tagger",
                lambda: WDTagger(ModelsParams(tagger=str(TINY_ROOT / "tagger")), TaggerParams(), dtype, device),
            ),
            (
                "BLIP large architecture",
                lambda: BlipCaptioner(ModelsParams(blip=str(full_size_blip(Path(tmp)))), blip_params, dtype, device),
            ),
            (
                "WD-v3 ViT-B/16 tagger architecture",
                lambda: WDTagger(ModelsParams(tagger=str(full_size_tagger(Path(tmp)))), TaggerParams(), dtype, device),
            ),
        ]
        for name, make in setups:
            captioner = make()
            one = rate(captioner, batch, 1)
            batched = rate(captioner, batch, args.batch)
            print(
                f"{name}: one at a time {one:.2f} img/s, batch {args.batch} {batched:.2f} img/s = {batched / one:.2f}x",
                flush=True,
            )
            del captioner


if __name__ == "__main__":
    main()
