"""Single-file SDXL checkpoints (A1111, ComfyUI, Forge, kohya): the original Stability (SGM) layout.

One safetensors file holds the whole pipeline under four prefixes:

- `model.diffusion_model.`: the U-Net (`input_blocks`, `middle_block`, `output_blocks`, `time_embed`,
  `label_emb`, `out`; resnets named `in_layers`/`emb_layers`/`out_layers`/`skip_connection`);
- `first_stage_model.`: the VAE (`encoder.down.N.block.M`, `mid.block_1`/`attn_1`/`block_2`, decoder
  blocks in reverse order under `decoder.up.N`, attention projections as 1x1 convolutions);
- `conditioner.embedders.0.transformer.`: CLIP ViT-L text, in transformers' own naming (`text_model.`);
- `conditioner.embedders.1.model.`: OpenCLIP ViT-bigG text in open_clip's naming (`transformer.resblocks`
  with a fused `attn.in_proj_weight`, `ln_final`, `positional_embedding`, `text_projection` as a matrix
  that multiplies from the right).

Like SDXL base 1.0's own file, an export also carries CLIP-L's `position_ids` and OpenCLIP's `logit_scale`,
which no diffusers module holds.

The mapping is derived from the state dict's own keys (block counts, layers per block, which blocks have
attention), not from SDXL's sizes, so the tiny test models map the same way as the real ones. The same
plan maps both ways: `diffusers_to_sgm` writes a checkpoint, `sgm_to_diffusers` reads one back (used to
verify an export and where diffusers' own loader cannot tell the two text encoders apart).

Reading is diffusers' `from_single_file` with a local config (a diffusers folder, or a hub id whose
configs are in the Hugging Face cache), so nothing is fetched.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.plumbing.errors import EaselError
from components.plumbing.tensor_tree import check_safetensors

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Stability's model-spec metadata, as kohya's sd-scripts write it; UIs show the title and architecture.
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class Entry:
    """One SGM tensor and the diffusers tensor(s) it comes from.

    kind: `same` (renamed only), `conv1x1` (a linear weight stored as a 1x1 convolution), `transposed`
    (open_clip's text_projection), `fused` (q, k, v concatenated along dim 0: open_clip's in_proj).
    """

    sgm: str
    diffusers: tuple[str, ...]
    kind: str = "same"


# -- U-Net ------------------------------------------------------------------------------------------

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _resnet_tail(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_NAMES:
        raise KeyError(rest)
    return f"{_RESNET_NAMES[head]}.{tail}"


def _count(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _unet_key(key: str, layers: int, up_attention: set[int]) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (layers + 1) + j
        return f"input_blocks.{index}.{f'0.{_resnet_tail(rest)}' if kind == 'resnets' else f'1.{rest}'}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_tail(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (layers + 1) + j
        return f"output_blocks.{index}.{f'0.{_resnet_tail(rest)}' if kind == 'resnets' else f'1.{rest}'}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the last resnet of its level, after its attention when there is one.
        slot = 2 if block in up_attention else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def unet_plan(keys: Iterable[str]) -> list[Entry]:
    keys = list(keys)
    layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_resnets = _count(keys, r"up_blocks\.0\.resnets\.(\d+)\.")
    if layers == 0 or up_resnets != layers + 1:
        raise EaselError(
            f"U-Net: {layers} resnets per down block and {up_resnets} per up block; "
            "the SGM layout needs N and N + 1 (a diffusers UNet2DConditionModel with one layers_per_block)"
        )
    up_attention = {int(m[1]) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return [Entry(UNET_PREFIX + _unet_key(k, layers, up_attention), (k,)) for k in keys]


# -- VAE --------------------------------------------------------------------------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_mid(rest: str) -> tuple[str, bool]:
    if m := re.fullmatch(r"resnets\.(\d)\.(.+)", rest):
        return f"mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest):
        return f"mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}", m[1] != "group_norm"
    raise KeyError(rest)


def _vae_key(key: str, up_blocks: int) -> tuple[str, bool]:
    """(LDM key, whether the tensor is an attention projection stored as a 1x1 convolution)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            return key, False
        raise KeyError(key)
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.') :]}", False
    if rest.startswith(("conv_in.", "conv_out.")):
        return key, False
    if rest.startswith("mid_block."):
        mid, conv = _vae_mid(rest[len("mid_block.") :])
        return f"{side}.{mid}", conv
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    # The LDM decoder numbers its levels from the lowest resolution up: diffusers' up_blocks reversed.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level = up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    raise KeyError(key)


def vae_plan(keys: Iterable[str], prefix: str = VAE_PREFIX) -> list[Entry]:
    keys = list(keys)
    up_blocks = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
    plan = []
    for k in keys:
        ldm, conv = _vae_key(k, up_blocks)
        plan.append(Entry(prefix + ldm, (k,), "conv1x1" if conv and k.endswith(".weight") else "same"))
    return plan


# -- text encoders ----------------------------------------------------------------------------------


def text_encoder_plan(keys: Iterable[str]) -> list[Entry]:
    # transformers 5 saves CLIPTextModel without its `text_model.` wrapper; the SGM file keeps it.
    return [Entry(TEXT_ENCODER_PREFIX + (k if k.startswith("text_model.") else "text_model." + k), (k,)) for k in keys]


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_LAYER_PARTS = "|".join(re.escape(k) for k in _OPEN_CLIP_LAYER)
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def text_encoder_2_plan(keys: Iterable[str]) -> list[Entry]:
    plan: list[Entry] = []
    fused: dict[str, dict[str, str]] = {}
    for key in keys:
        k = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            plan.append(Entry(TEXT_ENCODER_2_PREFIX + "text_projection", (key,), "transposed"))
        elif k in _OPEN_CLIP_TOP:
            plan.append(Entry(TEXT_ENCODER_2_PREFIX + _OPEN_CLIP_TOP[k], (key,)))
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = key
        elif m := re.fullmatch(rf"encoder\.layers\.(\d+)\.({_LAYER_PARTS})\.(.+)", k):
            sgm = f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"
            plan.append(Entry(TEXT_ENCODER_2_PREFIX + sgm, (key,)))
        else:
            raise KeyError(key)
    for sgm, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise EaselError(f"text_encoder_2: {sgm} lacks one of q, k, v")
        plan.append(Entry(TEXT_ENCODER_2_PREFIX + sgm, (parts["q"], parts["k"], parts["v"]), "fused"))
    return plan


_PLANS = {"unet": unet_plan, "vae": vae_plan, "text_encoder": text_encoder_plan, "text_encoder_2": text_encoder_2_plan}


def plan_for(component: str, keys: Iterable[str]) -> list[Entry]:
    try:
        return _PLANS[component](keys)
    except KeyError as exc:
        raise EaselError(f"{component}: no SGM name for the diffusers tensor {exc.args[0]!r}") from None


# -- both directions --------------------------------------------------------------------------------


_TE_POSITIONS = "embeddings.position_embedding.weight"


def diffusers_to_sgm(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Component state dicts (diffusers/transformers naming; any of the four) as one SGM state dict."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise EaselError(f"no SGM layout for the component(s) {', '.join(sorted(unknown))}")
    out: dict[str, torch.Tensor] = {}
    for name in (n for n in COMPONENTS if n in components):
        state = components[name]
        for entry in plan_for(name, state):
            tensors = [state[k] for k in entry.diffusers]
            if entry.kind == "fused":
                value = torch.cat(tensors, dim=0)
            elif entry.kind == "transposed":
                value = tensors[0].t()
            elif entry.kind == "conv1x1":
                value = tensors[0].reshape(*tensors[0].shape, 1, 1)
            else:
                value = tensors[0]
            if entry.sgm in out:
                raise EaselError(f"{name}: two tensors map to {entry.sgm}")
            out[entry.sgm] = value.contiguous()
    # Two tensors SDXL base 1.0's own file carries that no diffusers module holds; tools that repair
    # "broken" SDXL files add them back, so an export has them: CLIP-L's position ids (int64, 1 x 77) and
    # OpenCLIP's logit scale (ln 100, the trained value; no generation uses it).
    if "text_encoder" in components:
        state = components["text_encoder"]
        positions = state[_TE_POSITIONS if _TE_POSITIONS in state else "text_model." + _TE_POSITIONS].shape[0]
        out[TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    if "text_encoder_2" in components:
        dtype = components["text_encoder_2"]["text_projection.weight"].dtype
        out[TEXT_ENCODER_2_PREFIX + "logit_scale"] = torch.tensor(math.log(100.0), dtype=dtype)
    return out


def sgm_to_diffusers(checkpoint: Mapping[str, torch.Tensor], expected: dict[str, list[str]]) -> dict[str, dict]:
    """An SGM state dict back into component state dicts, given each component's diffusers keys.

    Every expected tensor must be present; SGM tensors no component expects (e.g. open_clip's
    logit_scale, CLIP's position_ids) are ignored, as every single-file loader ignores them.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, keys in expected.items():
        state: dict[str, torch.Tensor] = {}
        for entry in plan_for(name, keys):
            if entry.sgm not in checkpoint:
                raise EaselError(f"single-file checkpoint: {entry.sgm} is missing (needed for {name})")
            value = checkpoint[entry.sgm]
            if entry.kind == "fused":
                for key, part in zip(entry.diffusers, value.chunk(3, dim=0), strict=True):
                    state[key] = part
                continue
            if entry.kind == "transposed":
                value = value.t()
            elif entry.kind == "conv1x1":
                value = value.reshape(value.shape[0], value.shape[1])
            state[entry.diffusers[0]] = value
        out[name] = state
    return out


# -- reading a diffusers folder ---------------------------------------------------------------------

_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def _component_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """One component's tensors: a single safetensors file, or the shards its index names (diffusers shards
    weights over 10 GB, e.g. SDXL's U-Net in fp32); the plain files first, then the fp16 variant."""
    from safetensors.torch import load_file

    base = _WEIGHT_FILES[name]
    for variant in ("", ".fp16"):
        single, index = (
            folder / name / f"{base}{variant}.safetensors",
            folder / name / f"{base}{variant}.safetensors.index.json",
        )
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(_config(index)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(folder / name / shard)).items()}
    raise EaselError(f"{folder}: {name}/{base}.safetensors not found (export reads safetensors only)")


def read_pipeline_folder(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The four weight sets of a diffusers SDXL folder, straight from its safetensors files."""
    index = folder / "model_index.json"
    try:
        pipeline_class = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise EaselError(f"{index}: not a diffusers pipeline folder ({exc})") from None
    if pipeline_class != "StableDiffusionXLPipeline":
        raise EaselError(f"{index}: {pipeline_class!r} is not a StableDiffusionXLPipeline")
    return {name: _component_state(folder, name) for name in COMPONENTS}


def _config(path: Path) -> dict:
    """A JSON config file of the folder, or one EaselError naming it."""
    from components.plumbing.numbers import read_json

    value, problem = read_json(path)
    if problem or not isinstance(value, dict):
        raise EaselError(problem or f"{path}: not a JSON object")
    return value


# -- export -----------------------------------------------------------------------------------------


def _modelspec(folder: Path, title: str, prediction_type: str, resolution: int) -> dict[str, str]:
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    train_record = folder / "easel_train.json"
    if train_record.is_file():
        record = _config(train_record)
        meta["modelspec.description"] = (
            f"Easel full U-Net fine-tune of {record.get('base_model')}; {record.get('steps')} steps on "
            f"{record.get('images')} images (data {record.get('data_fingerprint')})"
        )
        meta["easel.train"] = json.dumps(record, sort_keys=True)
    return meta


class _FileTensors(Mapping):
    """The tensors of an open safetensors file, read one at a time (an SDXL file is 7 GB in fp16)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.names = set(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.names:
            raise KeyError(key)
        return self.handle.get_tensor(key)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _verify(path: Path, components: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every component tensor reads back from the written file unchanged (one component in memory at a time)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        written = _FileTensors(handle)
        for name, state in components.items():
            back = sgm_to_diffusers(written, {name: list(state)})[name]
            for key, value in state.items():
                if not torch.equal(back[key], value):
                    raise EaselError(f"export verification failed: {name}.{key} does not read back unchanged")


# An empty tensor whose presence says "v-prediction" to ComfyUI, Forge and kohya's scripts.
V_PRED_KEY = "v_pred"


def export_single_file(model_dir: str | Path, dest: str | Path, precision: str = "fp16") -> Path:
    """Write the diffusers SDXL pipeline in `model_dir` as one SGM-layout safetensors file at `dest`.

    `precision` is fp16, bf16 or fp32. The model card (the folder's README.md, with a line naming the
    file's precision) is written beside it as `<dest stem>.md`. The file is verified before it is
    renamed into place: every tensor maps back to the folder's tensor, in the new precision.
    Returns the path of the safetensors file.
    """
    from safetensors.torch import save_file

    from components.plumbing.fsutil import atomic_write_text

    model_dir, dest = Path(model_dir), Path(dest)
    if precision not in PRECISIONS:
        raise EaselError(f"export precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if dest.suffix != ".safetensors":
        raise EaselError(f"{dest}: a single-file checkpoint is written as .safetensors")
    dtype = PRECISIONS[precision]
    components = read_pipeline_folder(model_dir)
    components = {n: {k: v.to(dtype) for k, v in sd.items()} for n, sd in components.items()}
    checkpoint = diffusers_to_sgm(components)
    unet_config = _config(model_dir / "unet" / "config.json")
    scheduler_config = _config(model_dir / "scheduler" / "scheduler_config.json")
    if scheduler_config.get("prediction_type") == "v_prediction":
        checkpoint[V_PRED_KEY] = torch.tensor([])
    vae_scale = 2 ** (len(_config(model_dir / "vae" / "config.json")["block_out_channels"]) - 1)
    metadata = {
        "format": "pt",
        **_modelspec(
            model_dir,
            dest.stem,
            scheduler_config.get("prediction_type", "epsilon"),
            int(unet_config.get("sample_size", 128)) * vae_scale,
        ),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        save_file(checkpoint, str(tmp), metadata=metadata)
        tensors = len(checkpoint)
        del checkpoint  # the fused and transposed copies; the rest are views of `components`
        _verify(tmp, components)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    card = model_dir / "README.md"
    text = card.read_text() if card.is_file() else f"# {dest.stem}\n"
    atomic_write_text(
        dest.with_suffix(".md"),
        text.rstrip("\n")
        + f"\n\n## Single-file checkpoint\n\n`{dest.name}`: the same weights in the original SDXL (SGM) layout, "
        f"{precision}, for ComfyUI, AUTOMATIC1111, Forge and kohya's scripts.\n",
    )
    log.info("exported %s (%s, %d tensors)", dest, precision, tensors)
    return dest


# -- loading ----------------------------------------------------------------------------------------


def is_single_file(ref: str | Path) -> bool:
    """Whether `ref` is a local single-file checkpoint. Only safetensors are read: any other file (a .ckpt
    or .pt is a pickle, which can run code when loaded) is refused here, by name."""
    path = Path(ref)
    if not path.is_file():
        return False
    if path.suffix != ".safetensors":
        raise EaselError(f"{path}: only .safetensors single-file checkpoints are read (convert a {path.suffix} first)")
    check_safetensors(path)
    return True


def _config_widths(config: str) -> tuple[int, int] | None:
    """Hidden widths of the two text encoders in a local config folder (None for a hub id)."""
    folder = Path(config)
    if not folder.is_dir():
        return None
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        widths.append(int(_config(folder / name / "config.json")["hidden_size"]))
    return widths[0], widths[1]


def _text_encoder_2_from(checkpoint_path: Path, config: str, dtype: torch.dtype):
    """text_encoder_2 read with Easel's own SGM mapping.

    diffusers tells the two text encoders apart by the width of CLIP-L's position embedding: when both
    encoders are equally wide (small test models; never the real SDXL, 768 vs 1280) it would load CLIP-L
    into text_encoder_2. Then Easel reads that encoder itself.
    """
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(config) / "text_encoder_2"
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder))
    with safe_open(str(checkpoint_path), "pt") as handle:
        state = sgm_to_diffusers(_FileTensors(handle), {"text_encoder_2": list(model.state_dict())})["text_encoder_2"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def load_single_file_pipeline(path: str | Path, config: str, dtype: torch.dtype = torch.float32, **components: Any):
    """A StableDiffusionXLPipeline from a single-file checkpoint, offline.

    `config` is a diffusers folder or a hub id whose configs are in the Hugging Face cache; its
    tokenizers and scheduler are used as they are. `components` (e.g. `vae=`) replace what the file holds.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    if not is_single_file(path):
        raise EaselError(f"{path}: no such single-file checkpoint")
    widths = _config_widths(config)
    if widths is not None and widths[0] == widths[1] and "text_encoder_2" not in components:
        components["text_encoder_2"] = _text_encoder_2_from(path, config, dtype)
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=config, local_files_only=True, dtype=dtype, **components
        )
    except (OSError, ValueError, KeyError) as exc:
        raise EaselError(f"cannot load the single-file checkpoint {path} with config {config}: {exc}") from None
    if is_v_prediction(path):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_v_prediction(path: str | Path) -> bool:
    """Whether a single file marks its model as v-prediction, as ComfyUI and Forge read it (a `v_pred` key)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
    return V_PRED_KEY in keys
