"""A Hugging Face hub cache holding every repository the `sdxl` profile names, with small weights.

`from_pretrained("org/name")` with `HF_HUB_OFFLINE=1` reads `$HF_HUB_CACHE/models--org--name/`:
`refs/main` holds a commit hash, `snapshots/<commit>/` the files (links into `blobs/`). This builder
writes that layout for the real ids, with each repository's real file names, subfolders, fp16 variant
files, tokenizer and processor files, so the `sdxl` profile's loading code resolves every id, subfolder,
variant and revision exactly as it would online. Only the sizes are small (random weights, fixed seed).

File lists, checked against the repositories' public file listings (Nov 2026):

- stabilityai/stable-diffusion-xl-base-1.0: model_index.json; scheduler/scheduler_config.json;
  text_encoder/ and text_encoder_2/ (config.json, model.safetensors, model.fp16.safetensors);
  tokenizer/ and tokenizer_2/ (merges.txt, special_tokens_map.json, tokenizer_config.json, vocab.json);
  unet/, vae/ and vae_1_0/ (config.json, diffusion_pytorch_model.safetensors and .fp16.safetensors);
  the single files sd_xl_base_1.0.safetensors (with the 1.0 VAE, i.e. vae_1_0/) and
  sd_xl_base_1.0_0.9vae.safetensors (with the 0.9 VAE that vae/ re-instated). Left out: the ONNX,
  OpenVINO and Flax exports (vae_encoder/, vae_decoder/, *.onnx, *.msgpack), images, the offset LoRA.
- madebyollin/sdxl-vae-fp16-fix: config.json, diffusion_pytorch_model.safetensors, sdxl_vae.safetensors
  (the VAE alone in the original LDM key layout, for A1111). Left out: diffusion_pytorch_model.bin, images.
- Salesforce/blip-image-captioning-large: config.json, model.safetensors, preprocessor_config.json,
  special_tokens_map.json, tokenizer.json, tokenizer_config.json, vocab.txt. Left out: pytorch_model.bin,
  tf_model.h5.
- SmilingWolf/wd-vit-tagger-v3: config.json (timm), model.safetensors, selected_tags.csv (tag_id, name,
  category, count). Left out: model.onnx, model.msgpack, sw_jax_cv_config.json.
- timm/vit_large_patch14_clip_224.openai: open_clip_model.safetensors, the file open_clip 3.3 downloads
  for `ViT-L-14-quickgelu` + `openai` (its pretrained table points at this repository, safetensors
  first). Left out: timm's own config.json and weights, open_clip_pytorch_model.bin.

SDXL's tokenizer_config.json and special_tokens_map.json come out at the published byte sizes; the
contents of the other small JSON files (BLIP's tokenizer and processor files, the tagger's timm
config.json) follow the public formats but were not compared with the published files. Commit hashes
are derived from the content, not the hub's. Like a cache filled by `snapshot_download`, it has no
`.no_exist/` markers (which an online `from_pretrained` leaves for files a repository lacks), so a
loader that probes for a file the repository does not have fails here as it would on such a machine.

The LAION aesthetic weights are not on the hub: the builder writes a small
`sac+logos+ava1-l14-linearMSE.pth` (a state dict, as the real file is) and its sha256, for serving
over HTTPS. open_clip reads its model architecture from its own package, not from the hub, so the
small CLIP needs `register_small_open_clip()` in the loading process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.plumbing.fsutil import atomic_dir, atomic_write_json

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"
WD_TAGGER_V3 = "SmilingWolf/wd-vit-tagger-v3"
OPENAI_CLIP_L14 = "timm/vit_large_patch14_clip_224.openai"
OPEN_CLIP_NAME = "ViT-L-14-quickgelu"
LAION_FILE = "sac+logos+ava1-l14-linearMSE.pth"
MANIFEST = "hub-cache.json"
SDXL_SINGLE_FILE = "sd_xl_base_1.0.safetensors"
SDXL_SINGLE_FILE_09VAE = "sd_xl_base_1.0_0.9vae.safetensors"

# SDXL base 1.0's model_index.json as published (components and pipeline flags).
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass(frozen=True)
class SmallSizes:
    """The small stand-in sizes. The real topology is kept where loaders or the SGM mapping depend on it:
    three U-Net levels with two resnets each, four VAE levels, and two text encoders of different widths
    (768 and 1280 in SDXL), which is how single-file loaders tell them apart."""

    text_width: int = 32
    text_2_width: int = 48
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_heads: tuple[int, ...] = (2, 4, 4)
    unet_transformer_layers: tuple[int, ...] = (1, 1, 2)
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    time_embed_dim: int = 8
    clip_embed_dim: int = 32
    image_size: int = 64


@dataclass
class RepoFiles:
    """The files of one repository snapshot: path inside the repo -> bytes."""

    repo_id: str
    files: dict[str, bytes] = field(default_factory=dict)

    def add(self, path: str, data: bytes | str) -> None:
        self.files[path] = data.encode() if isinstance(data, str) else data

    def add_json(self, path: str, obj: dict) -> None:
        self.add(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def add_folder(self, prefix: str, folder: Path, names: tuple[str, ...] | None = None) -> None:
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder).as_posix()
            if f.is_file() and (names is None or rel in names):
                self.add(f"{prefix}{rel}", f.read_bytes())

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        return digest.hexdigest()


def write_repo(hub_dir: Path, repo: RepoFiles) -> str:
    """Write one repository in huggingface_hub's cache layout; returns its commit hash."""
    root = hub_dir / ("models--" + repo.repo_id.replace("/", "--"))
    commit = repo.commit
    for path, data in repo.files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        # Relative links, as huggingface_hub makes them, so the cache can be moved.
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return commit


# -- SDXL -------------------------------------------------------------------------------------------


def _text_config(width: int, projection: bool):
    from transformers import CLIPTextConfig

    # Token ids as in SDXL's text encoder configs; CLIP-L uses quick_gelu, OpenCLIP bigG gelu.
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _small_vae(sizes: SmallSizes, seed: int, force_upcast: bool = True):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        block_out_channels=sizes.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sizes.image_size,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )


def small_sdxl(sizes: SmallSizes, seed: int = 0):
    """A StableDiffusionXLPipeline with SDXL base 1.0's topology at small widths (random weights)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from components.models.tiny import SDXL_SCHEDULER
    from components.models.tokenizers import save_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sizes.image_size // 8,
        block_out_channels=sizes.unet_channels,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=sizes.unet_heads,
        transformer_layers_per_block=sizes.unet_transformer_layers,
        use_linear_projection=True,
        cross_attention_dim=sizes.text_width + sizes.text_2_width,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=4,
        addition_time_embed_dim=sizes.time_embed_dim,
        projection_class_embeddings_input_dim=sizes.text_2_width + 6 * sizes.time_embed_dim,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config(sizes.text_width, projection=False))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(sizes.text_2_width, projection=True))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(Path(tmp) / "t1", pad_token="<|endoftext|>")
        save_clip_tokenizer(Path(tmp) / "t2", pad_token="!")
        tokenizers = [CLIPTokenizer.from_pretrained(str(Path(tmp) / t)) for t in ("t1", "t2")]
    return StableDiffusionXLPipeline(
        vae=_small_vae(sizes, seed + 3),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
    )


def _special_token(content: str, typed: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


def _sdxl_tokenizer_files(repo: RepoFiles, folder: str, pad: str) -> None:
    """The four files of the repo's tokenizer folders: the slow-tokenizer format (vocab.json + merges.txt),
    no tokenizer.json. Every file comes out at the published size (tokenizer_config.json 737/725 bytes,
    special_tokens_map.json 472/460): AddedToken objects for bos/eos/unk, the pad token a plain string."""
    from components.models.tokenizers import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    # As transformers' CLIPTokenizer writes it (indented, UTF-8): 1.06 MB, as published; merges.txt 525 kB.
    repo.add(f"{folder}/vocab.json", json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    repo.add(f"{folder}/merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    names = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    repo.add_json(
        f"{folder}/special_tokens_map.json",
        {**{k: _special_token(v, typed=False) for k, v in names.items()}, "pad_token": pad},
    )
    repo.add_json(
        f"{folder}/tokenizer_config.json",
        {
            **{k: _special_token(v, typed=True) for k, v in names.items()},
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad,
            "tokenizer_class": "CLIPTokenizer",
        },
    )


def _with_text_model_prefix(path: Path) -> bytes:
    """transformers 5 saves CLIPTextModel without its `text_model.` wrapper; SDXL's published files (written
    by transformers 4) have it. The cache holds the published form, so loading it exercises the conversion."""
    from safetensors.torch import load_file, save

    state = load_file(str(path))
    renamed = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
    return save(renamed, metadata={"format": "pt"})


def _weights(folder: Path, name: str, variant: str | None) -> Path:
    base = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
    return folder / name / (f"{base}.{variant}.safetensors" if variant else f"{base}.safetensors")


def sdxl_base_repo(sizes: SmallSizes, seed: int = 0) -> RepoFiles:
    from safetensors.torch import save

    from components.models.single_file import diffusers_to_sgm

    repo = RepoFiles(SDXL_BASE)
    pipe = small_sdxl(sizes, seed)
    vae_1_0 = _small_vae(sizes, seed + 4)
    with tempfile.TemporaryDirectory() as tmp:
        full, half = Path(tmp) / "fp32", Path(tmp) / "fp16"
        pipe.save_pretrained(str(full), safe_serialization=True)
        vae_1_0.save_pretrained(str(full / "vae_1_0"), safe_serialization=True)
        # The fp16 variant holds the same weights rounded to fp16: a test can tell which file was read.
        pipe.to(torch.float16).save_pretrained(str(half), safe_serialization=True, variant="fp16")
        vae_1_0.to(torch.float16).save_pretrained(str(half / "vae_1_0"), safe_serialization=True, variant="fp16")
        repo.add_json("model_index.json", SDXL_MODEL_INDEX)
        repo.add_folder("scheduler/", full / "scheduler")
        for name in ("unet", "vae", "vae_1_0", "text_encoder", "text_encoder_2"):
            repo.add_folder(f"{name}/", full / name, ("config.json",))
            for folder, variant in ((full, None), (half, "fp16")):
                src = _weights(folder, name, variant)
                data = _with_text_model_prefix(src) if name.startswith("text_encoder") else src.read_bytes()
                repo.add(src.relative_to(folder).as_posix(), data)
        _sdxl_tokenizer_files(repo, "tokenizer", "<|endoftext|>")
        _sdxl_tokenizer_files(repo, "tokenizer_2", "!")
        components = {
            "unet": pipe.unet.state_dict(),
            "text_encoder": pipe.text_encoder.state_dict(),
            "text_encoder_2": pipe.text_encoder_2.state_dict(),
        }
        # The published single files are fp16: sd_xl_base_1.0 with the 1.0 VAE, the 0.9vae one with vae/.
        for name, vae in ((SDXL_SINGLE_FILE, vae_1_0), (SDXL_SINGLE_FILE_09VAE, pipe.vae)):
            sgm = diffusers_to_sgm({**components, "vae": vae.to(torch.float16).state_dict()})
            repo.add(name, save(sgm, metadata={"format": "pt"}))
    return repo


def sdxl_vae_fp16_fix_repo(sizes: SmallSizes, seed: int = 0) -> RepoFiles:
    from safetensors.torch import save

    from components.models.single_file import diffusers_to_sgm

    repo = RepoFiles(SDXL_VAE_FP16_FIX)
    vae = _small_vae(sizes, seed + 10, force_upcast=False)
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        repo.add_folder("", Path(tmp))
    # sdxl_vae.safetensors: the same VAE in the LDM layout without a prefix (what A1111 loads as a VAE).
    ldm = {k.removeprefix("first_stage_model."): v for k, v in diffusers_to_sgm({"vae": vae.state_dict()}).items()}
    repo.add("sdxl_vae.safetensors", save(ldm, metadata={"format": "pt"}))
    return repo


# -- captioners and CLIP ----------------------------------------------------------------------------


def blip_large_repo(sizes: SmallSizes, seed: int = 0) -> RepoFiles:
    from components.models.tiny import build_tiny_blip

    repo = RepoFiles(BLIP_LARGE)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_tiny_blip(folder, seed)
        # transformers 5 saves a processor_config.json; the published repo has the older per-part files
        # (preprocessor_config.json for the image processor, vocab.txt and special_tokens_map.json for BERT).
        repo.add_folder("", folder, ("config.json", "model.safetensors", "tokenizer.json"))
        image_processor = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        repo.add_json("preprocessor_config.json", {**image_processor, "processor_class": "BlipProcessor"})
        wordpiece = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
        repo.add("vocab.txt", "\n".join(sorted(wordpiece, key=wordpiece.get)) + "\n")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        local_keys = ("backend", "is_local", "local_files_only")
        repo.add_json("tokenizer_config.json", {k: v for k, v in config.items() if k not in local_keys})
        specials = ("cls_token", "mask_token", "pad_token", "sep_token", "unk_token")
        repo.add_json("special_tokens_map.json", {k: config[k] for k in specials})
    return repo


def wd_tagger_repo(sizes: SmallSizes, seed: int = 0) -> RepoFiles:
    from components.models.tiny import build_tiny_tagger

    repo = RepoFiles(WD_TAGGER_V3)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tagger(Path(tmp), seed)
        repo.add_folder("", Path(tmp), ("config.json", "model.safetensors", "selected_tags.csv"))
    return repo


def small_open_clip_config(sizes: SmallSizes) -> dict:
    """A small stand-in for open_clip's built-in ViT-L-14-quickgelu architecture (same keys, quick_gelu)."""
    return {
        "embed_dim": sizes.clip_embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def register_small_open_clip(config: dict) -> None:
    """Replace open_clip's ViT-L-14-quickgelu architecture by `config` in this process, through open_clip's
    public `add_model_config` (a JSON file named after the model)."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{OPEN_CLIP_NAME}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


def openai_clip_repo(sizes: SmallSizes, seed: int = 0) -> RepoFiles:
    import open_clip
    from safetensors.torch import save

    repo = RepoFiles(OPENAI_CLIP_L14)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**small_open_clip_config(sizes))
    repo.add("open_clip_model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    return repo


def _laion_weights(sizes: SmallSizes, path: Path, seed: int = 0) -> str:
    from components.models.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # LAION's own format: a plain state dict in a .pth (a pickle), read only because its sha256 is pinned.
    torch.save(AestheticMLP(sizes.clip_embed_dim).state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the whole cache --------------------------------------------------------------------------------

REPOS = (sdxl_base_repo, sdxl_vae_fp16_fix_repo, blip_large_repo, wd_tagger_repo, openai_clip_repo)


def build_hub_cache(out_dir: Path | str, sizes: SmallSizes = SmallSizes(), seed: int = 0) -> dict:
    """Write `out_dir/hub/` (a Hugging Face cache: point HF_HUB_CACHE at it), `out_dir/laion/` (the small
    aesthetic weights) and `out_dir/hub-cache.json` (commits, files, the weights' sha256, the small
    open_clip architecture). Returns that manifest. All or nothing: built in a temp folder, then renamed."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        manifest: dict = {"repos": {}}
        for build in REPOS:
            repo = build(sizes, seed)
            manifest["repos"][repo.repo_id] = {"commit": write_repo(tmp / "hub", repo), "files": sorted(repo.files)}
        laion = tmp / "laion" / LAION_FILE
        manifest["laion"] = {"file": f"laion/{LAION_FILE}", "sha256": _laion_weights(sizes, laion, seed)}
        manifest["open_clip"] = {"name": OPEN_CLIP_NAME, "config": small_open_clip_config(sizes)}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def snapshot_path(hub_dir: Path | str, repo_id: str, path: str = "") -> Path:
    """Where a file of the cached main snapshot lives (for tests and for pointing params at a cached file)."""
    root = Path(hub_dir) / ("models--" + repo_id.replace("/", "--"))
    return root / "snapshots" / (root / "refs" / "main").read_text().strip() / path


def copy_repo_folder(hub_dir: Path | str, repo_id: str, dest: Path | str) -> Path:
    """A plain folder copy of a cached snapshot (links resolved), e.g. as a local diffusers config."""
    return Path(shutil.copytree(snapshot_path(hub_dir, repo_id), dest, symlinks=False))
