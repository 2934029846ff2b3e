"""Single-file SDXL checkpoints: the SGM key layout both ways, `easel export`, and loading a single-file
base (and VAE) through diffusers' single-file loader, offline, for training and generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open

from components.cli import main
from components.config import ModelsParams
from components.evaluate.models import base as base_model
from components.models import single_file as sf
from components.models.hub_cache import SmallSizes, small_sdxl
from components.models.loaders import load_sdxl_parts, load_sdxl_pipeline
from components.plumbing.errors import ConfigError, EaselError
from components.plumbing.fsutil import sha256_file
from components.sdxl.generation import GenerationSettings, generate
from components.train import run_train
from components.train.cache import folder_identity
from tests.test_models import tiny_params
from tests.test_train import captioned_set, train_params

REPO = Path(__file__).resolve().parents[1]


def images(pipe) -> np.ndarray:
    settings = GenerationSettings(num_inference_steps=3, height=64, width=64)
    prompts, negatives = ["a travel poster of a harbour", "a film poster"], ["blurry", ""]
    return np.stack(generate(pipe, prompts, negatives, [3, 4], settings, output_type="np"))


def same_weights(module, other) -> bool:
    a, b = module.state_dict(), other.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small_sdxl_dir(tmp_path_factory) -> Path:
    """SDXL base 1.0's topology (3 levels, 2 resnets each, CLIP-L and bigG of different widths), small."""
    folder = tmp_path_factory.mktemp("small-sdxl") / "sdxl"
    small_sdxl(SmallSizes()).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_sgm_names_at_sdxl_topology_and_diffusers_reads_them_back(small_sdxl_dir):
    components = sf.read_pipeline_folder(small_sdxl_dir)
    sgm = sf.diffusers_to_sgm(components)
    prefixes = (sf.UNET_PREFIX, sf.VAE_PREFIX, sf.TEXT_ENCODER_PREFIX, sf.TEXT_ENCODER_2_PREFIX)
    counts = [len(components[n]) for n in sf.COMPONENTS]
    counts[3] -= 2 * 4  # per layer of the two, q/k/v weights and biases fuse into in_proj_weight and in_proj_bias
    counts[2] += 1  # CLIP-L's position_ids and OpenCLIP's logit_scale, as in SDXL base 1.0's own file
    counts[3] += 1
    assert [sum(k.startswith(p) for k in sgm) for p in prefixes] == counts
    unet = {k.removeprefix(sf.UNET_PREFIX) for k in sgm if k.startswith(sf.UNET_PREFIX)}
    # SDXL's numbering: input_blocks 1-8 (no attention at level 0), downsamplers at 3 and 6,
    # output_blocks 0-8 with upsamplers after the attention of 2 and 5, none at level 2.
    assert {".".join(k.split(".")[:2]) for k in unet if k.startswith("input_blocks")} == {
        f"input_blocks.{i}" for i in range(9)
    }
    assert {"input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "label_emb.0.0.weight"} <= unet
    assert {
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "middle_block.2.out_layers.3.bias",
    } <= unet
    assert not any(k.startswith(("input_blocks.1.1.", "output_blocks.6.1.", "output_blocks.8.2.")) for k in unet)
    vae, te2 = components["vae"], components["text_encoder_2"]
    # The LDM decoder counts levels from the lowest resolution: up.3 is diffusers' up_blocks.0.
    assert torch.equal(
        sgm["first_stage_model.decoder.up.3.block.0.conv1.weight"], vae["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )
    assert sgm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    fused = sgm["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = (te2[f"text_model.encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(fused, torch.cat([q, k, v]))
    assert torch.equal(sgm["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].t())
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in sgm
    positions = sgm["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    assert positions.dtype == torch.int64 and positions.tolist() == [list(range(77))]
    assert abs(float(sgm["conditioner.embedders.1.model.logit_scale"]) - 4.6052) < 1e-4
    # Both ways: Easel's reading and diffusers' own converters give back every tensor unchanged.
    back = sf.sgm_to_diffusers(sgm, {n: list(sd) for n, sd in components.items()})
    assert all(torch.equal(back[n][k], v) for n, sd in components.items() for k, v in sd.items())
    config = json.loads((small_sdxl_dir / "unet" / "config.json").read_text())
    by_diffusers = convert_ldm_unet_checkpoint(sgm, config)
    assert by_diffusers.keys() == components["unet"].keys()
    assert all(torch.equal(by_diffusers[k], v) for k, v in components["unet"].items())
    vae_back = convert_ldm_vae_checkpoint(sgm, json.loads((small_sdxl_dir / "vae" / "config.json").read_text()))
    assert vae_back.keys() == vae.keys() and all(torch.equal(vae_back[k], v) for k, v in vae.items())


def test_export_loads_with_the_single_file_loader_and_generates_the_same_images(small_sdxl_dir, tmp_path):
    path = sf.export_single_file(small_sdxl_dir, tmp_path / "poster.safetensors", "fp32")
    models = ModelsParams(sdxl=str(path), sdxl_config=str(small_sdxl_dir))
    from_file, folder = load_sdxl_pipeline(str(path), models), load_sdxl_pipeline(str(small_sdxl_dir))
    assert float(np.abs(images(from_file) - images(folder)).max()) <= 1e-5
    for name in sf.COMPONENTS:
        assert same_weights(getattr(from_file, name), getattr(folder, name)), name


def test_fine_tuned_from_a_single_file_base_then_exported(tiny_models, tmp_path):
    """Single file in (train from one, with a VAE override), single file out (fp32 exact; fp16 and bf16)."""
    base = sf.export_single_file(tiny_models / "sdxl", tmp_path / "base.safetensors", "fp32")
    torch.manual_seed(11)
    override = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_models / "sdxl" / "vae"))
    override.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    models = tiny_params(tiny_models).model_copy(
        update={"sdxl": str(base), "sdxl_config": str(tiny_models / "sdxl"), "vae": str(tmp_path / "vae")}
    )
    identity = base_model(models).identity  # the evaluation's image cache keys on the file's content
    assert identity.startswith(f"sha256:{sha256_file(base)}+config:") and folder_identity(str(base)) in identity
    parts = load_sdxl_parts(models)
    assert parts.config_source == str(tiny_models / "sdxl") and same_weights(parts.vae, override)
    assert same_weights(parts.text_encoder_2, load_sdxl_pipeline(str(tiny_models / "sdxl")).text_encoder_2)
    params = train_params(
        tmp_path, max_train_steps=2, sample_every_n_steps=2, sample_prompts=["a poster"], sample_steps=2
    )
    summary = run_train(params, models, captioned_set(tmp_path), progress=False)
    model = summary.model_dir
    assert (tmp_path / "train" / "samples" / "step-00000002").is_dir()

    exported = sf.export_single_file(model, tmp_path / "out" / "poster.safetensors", "fp32")
    as_file = ModelsParams(sdxl=str(exported), sdxl_config=str(model))
    from_file, folder = load_sdxl_pipeline(str(exported), as_file), load_sdxl_pipeline(str(model))
    assert float(np.abs(images(from_file) - images(folder)).max()) <= 1e-5
    assert same_weights(from_file.vae, override)  # the VAE the model was trained with travels in the file
    card = exported.with_suffix(".md").read_text()
    assert "base_model:" in card and "`poster.safetensors`" in card and "fp32" in card
    for precision, stored in (("fp16", "F16"), ("bf16", "BF16")):
        path = sf.export_single_file(model, tmp_path / "out" / f"poster-{precision}.safetensors", precision)
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
            dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118 (not a dict)
        assert dtypes.pop(f"{sf.TEXT_ENCODER_PREFIX}text_model.embeddings.position_ids") == "I64"
        assert set(dtypes.values()) == {stored}
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        assert meta["modelspec.resolution"] == "64x64" and json.loads(meta["easel.train"])["steps"] == 2
        pipe = load_sdxl_pipeline(str(path), ModelsParams(sdxl=str(path), sdxl_config=str(model)), dtype=torch.float32)
        assert np.isfinite(images(pipe)).all()


def test_export_reads_sharded_weights(tiny_models, tmp_path):
    """diffusers shards weights over 10 GB (SDXL's U-Net in fp32): the export reads the shards."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_models / "sdxl", tmp_path / "sharded"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_pretrained(str(tiny_models / "sdxl" / "unet")).save_pretrained(
        str(folder / "unet"), max_shard_size="200KB"
    )
    assert len(list((folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    whole = load_file(str(sf.export_single_file(tiny_models / "sdxl", tmp_path / "whole.safetensors", "fp32")))
    shards = load_file(str(sf.export_single_file(folder, tmp_path / "shards.safetensors", "fp32")))
    assert whole.keys() == shards.keys() and all(torch.equal(whole[k], shards[k]) for k in whole)


def test_easel_export_command(tiny_models, tmp_path, capsys):
    out = tmp_path / "poster.safetensors"
    args = ["--params", str(REPO / "params.yaml"), "export", "--model", str(tiny_models / "sdxl")]
    assert main([*args, "--out", str(out), "--precision", "bf16"]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file() and "export: " in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "poster.ckpt")]) == 2  # only .safetensors is written


def test_a_broken_safetensors_file_is_named_before_any_library_reads_it(tiny_models, tmp_path):
    """Pickle bytes under a .safetensors name, a header that claims more than the file holds, an empty
    file, tensors past the end of a cut copy: each is an EaselError naming the file."""
    import pickle
    import struct

    broken = {
        "pickled.safetensors": (pickle.dumps({"model.diffusion_model.x": [0.0] * 8}), "not a safetensors file"),
        "short.safetensors": (struct.pack("<Q", 10_000) + b'{"a": 1}', "not a safetensors file"),
        "empty.safetensors": (b"", r"not a safetensors file \(empty\)"),
        "cut.safetensors": (
            struct.pack("<Q", 64)
            + b'{"t":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}'.ljust(64)
            + b"\0" * 100,
            "truncated: its tensors need 4072 bytes, the file has 172",
        ),
    }
    models = ModelsParams(sdxl_config=str(tiny_models / "sdxl"))
    for name, (content, refused) in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EaselError, match=rf"{name}: {refused}"):
            load_sdxl_pipeline(str(tmp_path / name), models)


def test_bad_single_file_inputs_are_named(tiny_models, tmp_path):
    path = sf.export_single_file(tiny_models / "sdxl", tmp_path / "base.safetensors", "fp16")
    with pytest.raises(ConfigError, match=r"models\.sdxl_config must be set"):
        load_sdxl_pipeline(str(path), ModelsParams(sdxl=str(path)))
    with pytest.raises(EaselError, match=r"needs models\.sdxl_config"):
        load_sdxl_pipeline(str(path))
    (tmp_path / "old.ckpt").write_bytes(b"a pickle")
    with pytest.raises(EaselError, match=r"only \.safetensors"):
        load_sdxl_pipeline(str(tmp_path / "old.ckpt"), ModelsParams(sdxl_config=str(tiny_models / "sdxl")))
    with pytest.raises(EaselError, match=r"model_index\.json: not a diffusers pipeline folder"):
        sf.export_single_file(tmp_path, tmp_path / "x.safetensors")
    with pytest.raises(EaselError, match="export precision 'int8'"):
        sf.export_single_file(tiny_models / "sdxl", tmp_path / "x.safetensors", "int8")
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(EaselError, match="'StableDiffusionPipeline' is not a StableDiffusionXLPipeline"):
        sf.export_single_file(tmp_path / "sd15", tmp_path / "x.safetensors")
