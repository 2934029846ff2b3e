"""Run the `sdxl` profile's loading code against a built hub cache, in a fresh process.

The parent test sets HF_HUB_CACHE (the built cache), HF_HUB_OFFLINE=1, EASEL_CACHE and SSL_CERT_FILE
before this process imports anything, as on a machine whose cache holds the real models. The models
section is the `sdxl` profile's, with two changes only: the aesthetic weights' URL (a loopback HTTPS
server) and their sha256 (of the small file). Prints one JSON object of observations for the test.

    python tests/hub_cache_worker.py CACHE_OUT_DIR LAION_URL
    python tests/hub_cache_worker.py CACHE_OUT_DIR --train-pinned WORK_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def sdxl_profile_models():
    from components.config import load_params

    text = (REPO / "params.yaml").read_text().replace("profile: tiny", "profile: sdxl", 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text)
        return load_params(path)


def fp16_rounded(module) -> bool:
    """True when every weight is exactly representable in fp16: it was read from the fp16 variant file."""
    return all(torch.equal(p, p.half().float()) for p in module.parameters())


def same_weights(module, state: dict) -> bool:
    own = module.state_dict()
    return set(own) == set(state) and all(torch.equal(own[k].float(), state[k].float()) for k in own)


def images(pipe, seed: int = 3):
    from components.sdxl.generation import GenerationSettings, generate

    settings = GenerationSettings(num_inference_steps=3, height=64, width=64)
    return generate(pipe, ["a travel poster of a harbour"], ["blurry"], [seed], settings, output_type="np")[0]


def main(out_dir: Path, laion_url: str) -> dict:
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    from components.caption.tagger import WDTagger
    from components.models import hub_cache as hc
    from components.models.loaders import load_blip, load_sdxl_parts, load_sdxl_pipeline, load_vae
    from components.plumbing.errors import EaselError
    from components.scoring import ImageTextScorer

    manifest = json.loads((out_dir / hc.MANIFEST).read_text())
    hc.register_small_open_clip(manifest["open_clip"]["config"])
    params = sdxl_profile_models()
    models = params.models.model_copy(update={"aesthetic": laion_url, "aesthetic_sha256": manifest["laion"]["sha256"]})
    fix_vae = load_file(hf_hub_download(hc.SDXL_VAE_FP16_FIX, "diffusion_pytorch_model.safetensors"))
    seen: dict = {"models": models.model_dump()}

    parts = load_sdxl_parts(models)
    seen["parts"] = {
        "unet_dtype": str(parts.unet.dtype),
        "vae_dtype": str(parts.vae.dtype),
        "fp16_variant_read": [fp16_rounded(m) for m in (parts.unet, parts.text_encoder, parts.text_encoder_2)],
        "vae_is_override": same_weights(parts.vae, fix_vae),
        "tokenizer_ids": parts.tokenizer("a poster").input_ids,
        "tokenizer_2_pad": parts.tokenizer_2.pad_token,
        "noise_scheduler": type(parts.noise_scheduler).__name__,
        "config_source": parts.config_source,
        "without_variant_fp16_rounded": fp16_rounded(load_sdxl_parts(models.model_copy(update={"variant": None})).unet),
    }
    pinned = models.model_copy(update={"revision": manifest["repos"][hc.SDXL_BASE]["commit"]})
    seen["pinned_revision_loads"] = load_sdxl_parts(pinned).unet.config.addition_embed_type
    try:
        load_sdxl_parts(models.model_copy(update={"revision": "0" * 40}))
        seen["unknown_revision"] = "loaded"
    except EaselError as exc:
        seen["unknown_revision"] = str(exc)

    base = load_sdxl_pipeline(models.sdxl, models)
    seen["base_pipeline"] = {"vae_is_override": same_weights(base.vae, fix_vae), "image": list(images(base).shape)}

    image = Image.fromarray((images(base) * 255).round().astype("uint8"))
    model, processor = load_blip(models, device=torch.device("cpu"))
    ids = model.generate(**processor(images=[image], return_tensors="pt"), max_new_tokens=5)
    seen["blip_caption"] = processor.batch_decode(ids, skip_special_tokens=True)[0]
    tagged = WDTagger(models, params.caption.tagger, torch.float32, torch.device("cpu"))([image])[0]
    seen["tagger"] = {"tags": len(tagged), "ratings": sorted(t[0] for t in tagged if t[2] == 9)}
    with tempfile.TemporaryDirectory() as tmp:
        image.save(Path(tmp) / "poster.png")
        scores = ImageTextScorer(models, torch.device("cpu"), workers=0).score([Path(tmp) / "poster.png"], ["a"])
    seen["scores"] = {k: float(v[0]) for k, v in scores.items()}

    # The repository's own single file, read with the repository's configs from the cache.
    single = hf_hub_download(hc.SDXL_BASE, hc.SDXL_SINGLE_FILE)
    as_file = models.model_copy(update={"sdxl": single, "sdxl_config": hc.SDXL_BASE, "vae": None})
    from_file = load_sdxl_pipeline(single, as_file)
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae_1_0 = AutoencoderKL.from_pretrained(hc.SDXL_BASE, subfolder="vae_1_0", variant="fp16", dtype=torch.float32)
    folder = StableDiffusionXLPipeline.from_pretrained(hc.SDXL_BASE, variant="fp16", dtype=torch.float32, vae=vae_1_0)
    seen["single_file"] = {
        "max_abs_diff": float(abs(images(from_file) - images(folder)).max()),
        "vae_override": same_weights(
            load_sdxl_pipeline(single, as_file.model_copy(update={"vae": models.vae})).vae, fix_vae
        ),
        "parts_config_source": load_sdxl_parts(as_file).config_source,
    }
    vae_file = hf_hub_download(hc.SDXL_VAE_FP16_FIX, "sdxl_vae.safetensors")
    seen["vae_single_file"] = same_weights(load_vae(models.model_copy(update={"vae": vae_file})), fix_vae)
    return seen


def train_pinned(out_dir: Path, work: Path) -> dict:
    """One training step of the `sdxl` profile at the cached commit, from a cache whose SDXL repository
    has no refs/main (a commit-pinned download), through to the saved model."""
    from components.models import hub_cache as hc
    from components.train import run_train
    from tests.helpers import encode, make_caption_dir, noise

    manifest = json.loads((out_dir / hc.MANIFEST).read_text())
    params = sdxl_profile_models()
    models = params.models.model_copy(update={"revision": manifest["repos"][hc.SDXL_BASE]["commit"]})
    files = {f"p{i}.png": encode(noise(96, 80, seed=i), "PNG", dpi=(96, 96)) for i in range(2)}
    captions = make_caption_dir(work, files, ["a poster", "a travel poster"])
    train = params.train.model_copy(
        update={
            "out_dir": str(work / "train"),
            "checkpoint_dir": str(work / "ckpt"),
            "cache_dir": str(work / "cache"),
            "resolution": 64,
            "bucketing": params.train.bucketing.model_copy(update={"min_size": 32, "max_size": 128, "step": 16}),
            "max_train_steps": 1,
            "checkpoint_every": 0,
            "sample_every_n_steps": 0,
            "validation": params.train.validation.model_copy(update={"fraction": 0.0}),
        }
    )
    summary = run_train(train, models, captions, progress=False)
    scheduler = json.loads((work / "train" / "model" / "scheduler" / "scheduler_config.json").read_text())
    return {"steps": summary.steps, "scheduler": scheduler["_class_name"]}


if __name__ == "__main__":
    if sys.argv[2] == "--train-pinned":
        print(json.dumps(train_pinned(Path(sys.argv[1]), Path(sys.argv[3]))))
    else:
        print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
