"""The tiny offline models load through the same code as the real ones."""

import os

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.config import ModelsParams
from components.models.aesthetic import AestheticMLP, load_aesthetic_mlp
from components.models.loaders import load_blip, load_open_clip, load_sdxl_parts, load_sdxl_pipeline, resolve_ref
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import sha256_file
from tests.helpers import pickle_payload


def tiny_params(root) -> ModelsParams:
    return ModelsParams(
        sdxl=str(root / "sdxl"),
        blip=str(root / "blip"),
        clip_model=f"local-dir:{root / 'open_clip'}",
        aesthetic=str(root / "aesthetic" / "aesthetic_mlp.safetensors"),
    )


def test_clip_tokenizer_matches_open_clip(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models / "sdxl" / "tokenizer"))
    text = "A feline peering out from a striped transparent travel bag, sunset ambiance!"
    reference = [t for t in open_clip.get_tokenizer("ViT-L-14")([text])[0].tolist() if t]
    assert tok(text).input_ids == reference
    assert tok.model_max_length == 77


def test_tiny_sdxl_generates_with_a_negative_prompt(tiny_models):
    pipe = load_sdxl_pipeline(str(tiny_models / "sdxl"))
    image = pipe(
        prompt="a poster of a rocket",
        negative_prompt="blurry",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    assert pipe.vae_scale_factor == 8  # the same downsampling as the real SDXL VAE


def test_sdxl_parts_and_blip_and_clip_load(tiny_models):
    params = tiny_params(tiny_models)
    parts = load_sdxl_parts(params)
    assert parts.unet.config.addition_embed_type == "text_time"
    assert parts.noise_scheduler.config.num_train_timesteps == 1000
    model, processor = load_blip(params, device=torch.device("cpu"))
    ids = model.generate(
        **processor(images=[torch.zeros(3, 64, 64)], return_tensors="pt", do_rescale=False), max_new_tokens=5
    )
    assert ids.shape[0] == 1
    clip, _, tokenizer = load_open_clip(params, torch.device("cpu"))
    assert clip.encode_text(tokenizer(["hello"])).shape[-1] == 32


def test_aesthetic_loader_checks_width_and_architecture(tiny_models, tmp_path):
    path = tiny_models / "aesthetic" / "aesthetic_mlp.safetensors"
    assert isinstance(load_aesthetic_mlp(path, expected_input=32), AestheticMLP)
    with pytest.raises(EaselError, match="expect 32-d CLIP embeddings but the CLIP model gives 768-d"):
        load_aesthetic_mlp(path, expected_input=768)
    state = load_file(str(path))
    state["layers.2.weight"] = torch.zeros(64, 1024)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(EaselError, match="architecture mismatch"):
        load_aesthetic_mlp(tmp_path / "wrong.safetensors")
    # LAION's own format, a .pth, is read when its hash is pinned.
    torch.save(load_file(str(path)), tmp_path / "laion.pth")
    pinned = sha256_file(tmp_path / "laion.pth")
    assert isinstance(load_aesthetic_mlp(tmp_path / "laion.pth", 32, sha256=pinned), AestheticMLP)
    with pytest.raises(EaselError, match=r"read only when models\.aesthetic_sha256 pins"):
        load_aesthetic_mlp(tmp_path / "laion.pth", 32)


def test_pickled_code_is_refused(tmp_path):
    ran = tmp_path / "payload-ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(ran),))

    torch.save({"layers.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(EaselError, match="pickle file is read only when"):
        load_aesthetic_mlp(tmp_path / "evil.pth")  # not pinned: never opened
    pinned = sha256_file(tmp_path / "evil.pth")  # even pinned, the weights-only loader refuses the call
    with pytest.raises(EaselError, match="cannot be loaded safely"):
        load_aesthetic_mlp(tmp_path / "evil.pth", sha256=pinned)
    assert not ran.exists()
    with pytest.raises(ValueError, match=r"a pickle file is read only when models\.aesthetic_sha256"):
        ModelsParams(aesthetic="https://example.com/sac+logos+ava1-l14-linearMSE.pth")


def test_bad_model_reference_is_named():
    with pytest.raises(EaselError, match=r"models\.sdxl: './nowhere/sdxl' is neither an existing path nor a hub id"):
        resolve_ref("./nowhere/sdxl", "sdxl")
    assert resolve_ref("stabilityai/stable-diffusion-xl-base-1.0", "sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"


# Each model folder's weights file, and the pickle a library would fall back to beside it.
PICKLE_FALLBACKS = {
    "sdxl/unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "sdxl/text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "sdxl/vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "blip": ("model.safetensors", "pytorch_model.bin"),
    "tagger": ("model.safetensors", "pytorch_model.bin"),
    "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
}


@pytest.mark.parametrize("part", list(PICKLE_FALLBACKS))
def test_a_model_folder_with_only_pickle_weights_is_refused(tiny_models, tmp_path, part):
    """A model folder (a download, a hub cache, a registry version once fetched) whose safetensors
    file was swapped for a pickle: the loader refuses it, by name, and the pickle never runs."""
    import shutil

    from components.caption.tagger import WDTagger
    from components.config import TaggerParams

    root = tmp_path / "models"
    shutil.copytree(tiny_models, root)
    safe, pickled = PICKLE_FALLBACKS[part]
    (root / part / safe).unlink()
    ran = tmp_path / "payload-ran"
    (root / part / pickled).write_bytes(pickle_payload(ran))
    params = tiny_params(root).model_copy(update={"tagger": str(root / "tagger")})
    load = {
        "sdxl": lambda: load_sdxl_parts(params),
        "blip": lambda: load_blip(params),
        "tagger": lambda: WDTagger(params, TaggerParams(), torch.float32, torch.device("cpu"))._load(),
        "open_clip": lambda: load_open_clip(params, torch.device("cpu")),
    }[part.split("/")[0]]
    with pytest.raises(EaselError, match=r"cannot load models\.|has no .*safetensors"):
        load()
    if part.startswith("sdxl"):  # the pipeline the evaluation loads, too
        with pytest.raises(EaselError, match=r"cannot load models\."):
            load_sdxl_pipeline(str(root / "sdxl"), params)
    assert not ran.exists()


def test_a_hub_repository_without_safetensors_weights_is_refused(monkeypatch, tmp_path):
    """timm and open_clip fall back to a pickle when a hub repository lacks the safetensors file;
    Easel asks for that file first. The hub is mocked (none is reachable here): it has no such file."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from components.caption.tagger import WDTagger
    from components.config import TaggerParams

    asked = []

    def no_safetensors(repo, filename, **kwargs):
        asked.append((repo, filename))
        raise EntryNotFoundError(f"{filename} not in {repo}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_safetensors)
    tagger = WDTagger(ModelsParams(tagger="org/pickle-tagger"), TaggerParams(), torch.float32, torch.device("cpu"))
    with pytest.raises(EaselError, match=r"models\.tagger: model\.safetensors cannot be had from org/pickle-tagger"):
        tagger._load()
    clip = ModelsParams(clip_model="ViT-L-14-quickgelu", clip_pretrained="openai")
    refused = r"open_clip_model\.safetensors cannot be had from timm/vit_large_patch14_clip"
    with pytest.raises(EaselError, match=refused):
        load_open_clip(clip, torch.device("cpu"))
    assert asked == [
        ("org/pickle-tagger", "model.safetensors"),
        ("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"),
    ]
