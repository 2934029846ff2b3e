"""params.yaml: load, apply the profile, validate every key, and say exactly which key is wrong.

Each stage reads only its own section (plus `models` or `storage` where it needs them). The profile
named by `profile:` is deep-merged over the sections first, so `profile: sdxl` switches the model
set and the scale of every stage in one line.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from components.plumbing.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
# The pipeline's stages in order (dvc.yaml, the CLI and the flows all follow it), and where their metrics go.
STAGES = ("download", "validate", "caption", "train", "evaluate", "promote")
# The same names as a type: the flows' `stages` parameter, so Prefect refuses a misspelt stage
# when a run is created, before anything runs.
StageName = Literal["download", "validate", "caption", "train", "evaluate", "promote"]
assert get_args(StageName) == STAGES
# dvc.yaml tracks profiles.<profile>.<section> for these, so every profile must set them.
PROFILE_SECTIONS = ("models", "train", "evaluate", "gate")
SECTIONS = (
    "models",
    "storage",
    "sample_source",
    "orchestration",
    "download",
    "validate",
    "caption",
    "train",
    "evaluate",
    "promote",
    "gate",
)
REQUIRED_SECTIONS = ("profile", "storage", "download", "validate", "evaluate", "promote", "gate")
S3_ENDPOINT_ENV = "EASEL_S3_ENDPOINT"  # any S3 instead of the embedded server (components.storage)


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of ignoring them. No
    # setting means anything as NaN or infinity (an infinite margin would pass every model).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Checkpoint files that are pickles (torch.save, PyTorch Lightning, pickle itself): never read.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class ModelsParams(Section):
    sdxl: str | None = None
    # The diffusers configs (folder or hub id) a single-file `sdxl` checkpoint is read with.
    sdxl_config: str | None = None
    vae: str | None = None
    revision: str | None = None
    variant: str | None = None
    blip: str | None = None
    tagger: str | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    aesthetic: str | None = None
    aesthetic_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    # Prompt tokens the text encoders read, in training and generation alike: 75 (CLIP's own), or
    # 150 / 225 with a chunked encoding (components/sdxl/prompt_encoding.py). Captions are checked against it.
    max_token_length: Literal[75, 150, 225] = 75
    # How prompts past 75 tokens are cut into chunks and joined, in training and generation alike: as kohya
    # sd-scripts (2 + 75 n states), ComfyUI or AUTOMATIC1111 / Forge (77 n states) do.
    long_prompt_mode: Literal["kohya", "comfyui", "a1111"] = "kohya"

    @field_validator("sdxl", "vae", "clip_pretrained")
    @classmethod
    def _no_pickle_checkpoints(cls, value: str | None) -> str | None:
        """Refused when params load, before anything is imported or read: a pickle runs code when loaded."""
        if value and value.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(
                "a pickle checkpoint, which can run code when it is loaded, is not read; convert it to "
                ".safetensors first (or name a diffusers folder or hub id)"
            )
        return value

    @model_validator(mode="after")
    def _aesthetic_pickle_only_pinned(self) -> ModelsParams:
        # LAION publishes the aesthetic MLP only as a .pth: read (weights-only) when its hash is pinned.
        pickle = bool(self.aesthetic) and self.aesthetic.lower().split("?")[0].endswith(PICKLE_SUFFIXES)
        if pickle and not self.aesthetic_sha256:
            raise ValueError(
                "models.aesthetic: a pickle file is read only when models.aesthetic_sha256 pins its content "
                "(the published file's sha256); or convert it to .safetensors"
            )
        return self

    def require(self, *names: str) -> None:
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(
                "params.yaml: models." + ", models.".join(missing) + " must be set "
                "(set them in `models:` or in the active profile)"
            )


class EmbeddedS3Params(Section):
    port: int = Field(8333, ge=1, le=65535)
    data_dir: str = ".easel/s3"


class StorageParams(Section):
    bucket: str
    dvc_prefix: str = "dvc"
    registry_prefix: str = "registry"
    # s3://<bucket>/<shard_prefix>/<run>/: where a run's shards swap inputs and results (deleted after the run)
    shard_prefix: str = Field("shards", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    embedded: EmbeddedS3Params = EmbeddedS3Params()
    # Bounded waits for every S3 call: a hanging endpoint fails after (retries + 1) x read_timeout_s.
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    read_timeout_s: float = Field(10.0, gt=0, le=3600)
    retries: int = Field(1, ge=0, le=10)


class SampleSourceParams(Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    dir: str = ".easel/sample-source"


class PrefectServerParams(Section):
    host: str = "127.0.0.1"
    port: int = Field(4200, ge=1, le=65535)
    data_dir: str = ".easel/prefect"


class NotifyParams(Section):
    # The Prefect notification block the automation sends to (a Slack webhook, a custom webhook...).
    block: str = Field("easel-notify", pattern=r"^[a-z0-9-]+$")
    # Flow-run states that notify: the gate's verdicts that keep production as it is, and failures.
    states: list[Literal["Rejected", "Inconclusive", "Failed", "Crashed", "TimedOut"]] = [
        "Rejected",
        "Inconclusive",
        "Failed",
        "Crashed",
        "TimedOut",
    ]


class OrchestrationParams(Section):
    prefect: PrefectServerParams = PrefectServerParams()
    # A run that takes longer fails (TimedOut), and so does a stage: a hung stage never hangs the run.
    flow_timeout_s: float = Field(172800, gt=0)
    stage_timeout_s: dict[str, float] = {}
    # Retries of a stage task after a temporary failure (storage that did not answer, a killed process).
    # A deterministic failure (bad params, bad input, a bug) is never retried.
    retries: dict[str, int] = {"download": 2}
    notify: NotifyParams = NotifyParams()

    @field_validator("stage_timeout_s", "retries")
    @classmethod
    def _stages_only(cls, value: dict, info: ValidationInfo) -> dict:
        unknown = [k for k in value if k not in STAGES]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))}: not a stage ({', '.join(STAGES)})")
        if any(v <= 0 for v in value.values()) and info.field_name == "stage_timeout_s":
            raise ValueError("timeouts must be > 0")
        if any(v < 0 or v > 10 for v in value.values()) and info.field_name == "retries":
            raise ValueError("retries must be in [0, 10]")
        return value

    def stage_timeout(self, stage: str) -> float:
        return self.stage_timeout_s.get(stage, self.flow_timeout_s)


class SourceParams(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str  # a URL list file, a local folder of images, or s3://bucket/prefix
    url_column: str = "url"
    url_prefix: str | None = None


class DownloadParams(Section):
    sources: list[SourceParams] = Field(min_length=1)
    out_dir: str = "data/download"
    workers: int = Field(1, ge=1, le=256)  # processes on this machine (each runs `concurrency` requests)
    concurrency: int = Field(16, ge=1, le=1024)
    per_host_concurrency: int = Field(8, ge=1, le=1024)
    per_host_rate: float = Field(0.0, ge=0)  # requests per second per host; 0 = no limit
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0)
    total_timeout_s: float = Field(60.0, gt=0)  # per request: a slow drip cannot hold a worker forever
    retries: int = Field(2, ge=0, le=10)
    max_redirects: int = Field(5, ge=0, le=20)
    max_bytes: int = Field(25_000_000, gt=0)
    # One archive source file (zip, tar, shard): read for at most this long and this many bytes,
    # local or remote, so a dripping server or a huge member cannot hold the stage.
    archive_timeout_s: float = Field(3600.0, gt=0)
    max_archive_bytes: int = Field(20_000_000_000, gt=0)
    verify_tls: bool = True
    allow_networks: list[str] = []
    robots_optout: list[str] = ["noai", "noimageai"]
    user_agent: str = "Easel/0.1"
    allow_empty: bool = False  # a source with no rows (or no URLs) is an error unless this says it is expected

    @field_validator("allow_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not an IP network (e.g. 127.0.0.0/8)") from exc
        return value

    @model_validator(mode="after")
    def _unique_source_names(self) -> DownloadParams:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self


class AssumeDpi(Section):
    assume: float = Field(gt=0)


class NearDuplicateParams(Section):
    enabled: bool = True
    max_distance: int = Field(4, ge=0, le=16)  # pHash bits that may differ (of 64)


class CurateParams(Section):
    enabled: bool = False
    keep_top_share: float | None = Field(None, gt=0, le=1)  # keep the best share of accepted images
    min_aesthetic: float | None = None  # and/or those scoring at least this
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _a_criterion(self) -> CurateParams:
        if self.enabled and self.keep_top_share is None and self.min_aesthetic is None:
            raise ValueError("curate is enabled but sets neither keep_top_share nor min_aesthetic")
        return self


class ValidateParams(Section):
    out_dir: str = "data/validate"
    min_short_side: int = Field(512, ge=1)
    max_short_side: int = Field(1024, ge=1)
    min_long_side: int = Field(512, ge=1)
    max_long_side: int = Field(1024, ge=1)
    min_aspect_ratio: float = Field(0.25, gt=0)  # width / height
    max_aspect_ratio: float = Field(4.0, gt=0)
    min_dpi: float = Field(96, ge=0)
    missing_dpi: Literal["reject", "accept"] | AssumeDpi = "reject"
    min_kb_per_pixel: float = Field(0.0005, ge=0)
    allowed_formats: list[str] = ["JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF", "AVIF"]
    allowed_modes: list[str] = ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I"]
    allow_animated: bool = False
    caption_column: str | None = "caption"  # a source with this column must fill it for every image
    near_duplicates: NearDuplicateParams = NearDuplicateParams()
    max_image_pixels: int = Field(40_000_000, gt=0)
    min_accepted: int = Field(1, ge=0)
    min_accepted_share: float = Field(0.0, ge=0, le=1)
    workers: int = Field(1, ge=1, le=256)
    cache_dir: str = ".easel/cache/validate"  # each file's metadata by sha256: shards fill it, reruns reuse it
    curate: CurateParams = CurateParams()

    @field_validator("missing_dpi", mode="before")
    @classmethod
    def _dpi_policy(cls, value: object) -> object:
        if value in ("reject", "accept") or isinstance(value, dict):
            return value
        raise ValueError("expected reject, accept or {assume: <dpi>}")

    @model_validator(mode="after")
    def _ranges(self) -> ValidateParams:
        for low, high in (
            ("min_short_side", "max_short_side"),
            ("min_long_side", "max_long_side"),
            ("min_aspect_ratio", "max_aspect_ratio"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) is above {high} ({getattr(self, high)})")
        return self


class BlipParams(Section):
    enabled: bool = True
    prompt: str | None = None  # a text prefix the caption continues, e.g. "a poster of"
    max_new_tokens: int = Field(40, ge=1)
    num_beams: int = Field(3, ge=1)


class TaggerParams(Section):
    enabled: bool = True
    general_threshold: float = Field(0.35, ge=0.05, le=1)  # >= 0.05: what the cache keeps
    character_threshold: float = Field(0.85, ge=0.05, le=1)
    max_tags: int = Field(40, ge=0)
    exclude: list[str] = []  # tags never written (after normalisation: spaces, not underscores)
    include_rating: bool = False  # add the top rating tag (general, sensitive, ...)


class CaptionParams(Section):
    out_dir: str = "data/caption"
    batch_size: int = Field(8, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    blip: BlipParams = BlipParams()
    tagger: TaggerParams = TaggerParams()
    # {trigger} {source} {blip} {source_or_blip} {tags}; empty parts and repeats are dropped
    template: str = "{trigger}, {source_or_blip}, {tags}"
    trigger: str | None = None  # a token for concept training, written first
    replacements: dict[str, str] = {}  # applied to every tag and caption part, after normalisation
    word_replacements: dict[str, str] = {}  # applied to whole words inside every part ("1girl" in "1girl standing")
    source_caption_column: str = "caption"  # the source column (src_<name>) holding a caption, if any

    @field_validator("template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        import string

        known = {"trigger", "source", "blip", "source_or_blip", "tags"}
        used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if used - known:
            raise ValueError(f"unknown placeholder(s) {sorted(used - known)}; known: {sorted(known)}")
        return value


class BucketParams(Section):
    enabled: bool = True
    min_size: int = Field(512, ge=16)  # shortest bucket side, px
    max_size: int = Field(2048, ge=16)  # longest bucket side, px
    step: int = Field(64, ge=8)  # bucket sides are multiples of this (and of 8, the VAE's factor)
    no_upscale: bool = False  # never upscale an image to fit a bucket (smaller images get own buckets)

    @model_validator(mode="after")
    def _sizes(self) -> BucketParams:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is above max_size ({self.max_size})")
        if self.step % 8:
            raise ValueError(f"step must be a multiple of 8 (the VAE downsamples by 8); got {self.step}")
        return self


class OptimizerArgs(Section):
    weight_decay: float | None = Field(None, ge=0)
    betas: tuple[float, float] | None = None
    eps: float | None = Field(None, gt=0)
    # Adafactor's own:
    clip_threshold: float | None = Field(None, gt=0)
    relative_step: bool | None = None
    scale_parameter: bool | None = None
    warmup_init: bool | None = None
    # Which two dimensions Adafactor factors its second moment over: last_two (transformers, kohya:
    # for a 3x3 convolution that is the kernel, and the state is 2/3 of the weights' size) or
    # largest_two (the reference Mesh-TF/optax choice: output and input channels, a few MB).
    factored_dims: Literal["last_two", "largest_two"] | None = None


class SchedulerArgs(Section):
    num_cycles: int | float | None = None  # cosine_with_restarts: restarts; cosine: half-waves
    power: float | None = None  # polynomial


class EmaParams(Section):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1)
    update_every: int = Field(1, ge=1)  # optimizer steps between EMA updates
    # diffusers' warm-up: update n keeps min(decay, (1 + n) / (10 + n)), so a high decay is reached
    # only after thousands of updates. Off: `decay` from the second update, a horizon of
    # update_every / (1 - decay) steps (the run's log and metrics state the horizon it reached).
    warmup: bool = True
    use_for_save: bool = True  # save the EMA weights as the model
    # Where the averaged copy lives: beside the U-Net on the accelerator, or in CPU memory (updated
    # there every update_every steps), which frees a whole copy of the weights from the device.
    device: Literal["accelerator", "cpu"] = "accelerator"
    dtype: Literal["float32", "bf16"] = "float32"  # bf16: half the memory, updates stochastically rounded


class ValidationParams(Section):
    fraction: float = Field(0.0, ge=0, lt=1)  # share of images held out (chosen by sha256, stable)
    every_n_steps: int = Field(0, ge=0)  # 0: only at the end
    keep_best: bool = True  # keep the checkpoint with the lowest validation loss


class TrainParams(Section):
    out_dir: str = "data/train"
    seed: int = 42
    # data
    resolution: int = Field(1024, ge=64)  # target area resolution**2 of every bucket
    bucketing: BucketParams = BucketParams()
    center_crop: bool = True  # else a random crop (not with cached latents)
    random_flip: bool = False
    # captions
    shuffle_caption: bool = False  # shuffle the comma-separated parts after the first keep_tokens
    keep_tokens: int = Field(0, ge=0)
    caption_dropout: float = Field(0.0, ge=0, le=1)  # train this share of steps unconditionally (CFG)
    empty_prompt: Literal["zeros", "encode"] = "zeros"  # how a dropped caption is conditioned
    # noise and loss
    noise_offset: float = Field(0.0, ge=0)
    min_snr_gamma: float | None = Field(None, gt=0)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the base model's
    min_timestep: int = Field(0, ge=0)
    max_timestep: int = Field(1000, ge=1)  # exclusive
    # optimizer
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    learning_rate: float = Field(1e-6, gt=0)
    optimizer_args: OptimizerArgs = OptimizerArgs(weight_decay=1e-2)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_args: SchedulerArgs = SchedulerArgs()
    max_train_steps: int = Field(1000, ge=1)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)  # null: no clipping
    # precision and memory
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # U-Net weights and gradients in bf16 (no fp32 master copy); every weight update is rounded
    # stochastically, or updates below bf16's resolution would vanish. Needs mixed_precision bf16.
    full_bf16: bool = False
    # The optimizer steps each parameter as soon as its gradient is complete, inside backward, and
    # frees that gradient: the gradients never all exist at once.
    fused_backward_pass: bool = False
    save_precision: Literal["float", "fp16", "bf16"] = "float"
    allow_tf32: bool = True
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    cache_latents: bool = False  # VAE latents on disk, keyed by image sha256 + VAE + size + flip
    cache_text_embeddings: bool = False  # text-encoder outputs on disk, keyed by caption + encoders
    cache_dir: str = ".easel/cache/train"
    cache_memory_mb: int = Field(1024, ge=0)  # cached tensors also kept in RAM, up to this much per cache
    dataloader_num_workers: int = Field(0, ge=0)  # worker processes reading images or cache files
    # EMA
    ema: EmaParams = EmaParams()
    # checkpoints
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps; 0: none
    keep_checkpoints: int = Field(3, ge=1)
    checkpoint_dir: str = ".easel/checkpoints"
    resume_from_checkpoint: str | None = None  # null | latest | a checkpoint folder
    # samples and validation
    sample_every_n_steps: int = Field(0, ge=0)
    sample_prompts: list[str] = []
    sample_negative_prompt: str | None = "basic"  # a preset name or literal text
    sample_seed: int = 0
    sample_steps: int = Field(20, ge=1)
    validation: ValidationParams = ValidationParams()
    log_every_n_steps: int = Field(10, ge=1)  # dvclive curves are written in groups of this many steps

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep})")
        if self.cache_latents and not self.center_crop:
            raise ValueError("cache_latents needs center_crop: a cached latent is one fixed crop")
        if self.cache_text_embeddings and (self.shuffle_caption or self.caption_dropout):
            raise ValueError(
                "cache_text_embeddings cannot be used with shuffle_caption or caption_dropout: "
                "the text changes from step to step"
            )
        if self.full_bf16:
            if self.mixed_precision != "bf16":
                raise ValueError(
                    f"full_bf16 needs mixed_precision: bf16 (got {self.mixed_precision!r}): the U-Net computes in bf16"
                )
            if self.optimizer not in ("adamw", "adafactor"):
                raise ValueError(
                    f"full_bf16 works with optimizer adamw or adafactor, whose updates Easel rounds "
                    f"stochastically (got {self.optimizer!r})"
                )
        if self.fused_backward_pass:
            self._check_fused()
        return self

    def _check_fused(self) -> None:
        """What stepping each parameter inside backward cannot do, refused by name."""
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"fused_backward_pass works with optimizer adamw or adafactor (got {self.optimizer!r})")
        if self.gradient_accumulation_steps > 1:
            raise ValueError(
                "fused_backward_pass cannot be used with gradient_accumulation_steps > 1 "
                f"(got {self.gradient_accumulation_steps}): each micro-batch's gradient would be applied at once, "
                "not summed first; raise train_batch_size instead"
            )
        if self.max_grad_norm is not None:
            raise ValueError(
                "fused_backward_pass cannot clip by the global gradient norm (max_grad_norm "
                f"{self.max_grad_norm}): the norm is known only after the last parameter has been updated. "
                "Set max_grad_norm: null (Adafactor's clip_threshold still bounds each update)"
            )
        if self.mixed_precision == "fp16":
            raise ValueError(
                "fused_backward_pass cannot be used with mixed_precision fp16: the loss scaler must see every "
                "gradient before any step; use bf16"
            )


class GuidanceParams(Section):
    mode: Literal["cfg", "dual"] = "cfg"  # cfg: eq. 9 (diffusers); dual: eq. 8 with separate scales
    scale: float = Field(5.0, ge=0)  # s (cfg) or s+ (dual)
    negative_scale: float | None = Field(None, ge=0)  # s- (dual); null: s+ - 1, which equals cfg
    negative_delay: float = Field(0.0, ge=0, le=1)  # fraction of steps before the negative prompt acts


class BootstrapParams(Section):
    resamples: int = Field(10_000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


# Roles the evaluate stage gives its own models; the gate reads scores.csv by these names.
EVALUATE_ROLES = ("candidate", "production", "base")
REGISTRY_REF = r"^registry:([a-z0-9][a-z0-9._-]*)/([a-z0-9][a-z0-9._-]*)$"


class PanelModelParams(Section):
    """A model the evaluation scores beside the candidate, on the same prompts, seeds and guidance."""

    # The model's row in scores.csv, its images folder and its leaderboard row.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)
    # A diffusers pipeline folder, a single-file .safetensors checkpoint, or registry:<model_name>/<version or alias>.
    ref: str = Field(min_length=1)
    # For a single file: the diffusers configs it is read with (default: models.sdxl_config).
    config: str | None = None

    @field_validator("name")
    @classmethod
    def _not_a_role(cls, value: str) -> str:
        if value in EVALUATE_ROLES:
            raise ValueError(f"{value!r} names one of the evaluation's own models ({', '.join(EVALUATE_ROLES)})")
        return value

    @field_validator("ref")
    @classmethod
    def _registry_form(cls, value: str) -> str:
        import re

        if value.startswith("registry:") and not re.match(REGISTRY_REF, value):
            raise ValueError("a registry model is named registry:<model_name>/<version or alias>")
        return value


class EvaluateParams(Section):
    out_dir: str = "data/evaluate"
    prompts: str = "data/prompts/eval_prompts.csv"
    max_prompts: int | None = Field(None, ge=1)  # a quick subset: this many, taken round-robin over categories
    seeds: list[int] = Field([0, 1], min_length=1)
    negative_prompt: str | None = "basic"  # for prompts with none: a preset name or literal text
    guidance: GuidanceParams = GuidanceParams()
    sampler: Literal["euler", "euler_a", "dpmpp_2m", "ddim"] | None = None  # null: the model's own
    num_inference_steps: int = Field(30, ge=1)
    height: int = Field(1024, ge=8)
    width: int = Field(1024, ge=8)
    batch_size: int = Field(4, ge=1)
    compare_with: list[Literal["production", "base"]] = ["production", "base"]
    bootstrap: BootstrapParams = BootstrapParams()
    cache_dir: str = ".easel/cache/generations"  # images by (model, prompt, seed, settings)
    scorer_batch_size: int = Field(16, ge=1)
    scorer_workers: int = Field(2, ge=0)  # DataLoader workers decoding and preprocessing for the scorer
    panel: list[PanelModelParams] = []  # more models, generated and scored like the candidate (no paired comparison)
    # The cumulative table of every model scored, kept outside out_dir, which each run replaces whole.
    leaderboard: str = "data/leaderboard.csv"

    @field_validator("panel")
    @classmethod
    def _unique_names(cls, value: list[PanelModelParams]) -> list[PanelModelParams]:
        names = [m.name for m in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"panel model names must be unique; repeated: {', '.join(repeated)}")
        return value

    @field_validator("leaderboard")
    @classmethod
    def _outside_out_dir(cls, value: str, info: ValidationInfo) -> str:
        if Path(value).suffix != ".csv":
            raise ValueError("must be a .csv file")
        out_dir, board = Path(info.data.get("out_dir", "data/evaluate")).absolute(), Path(value).absolute()
        if out_dir in board.parents:
            raise ValueError(f"lies in evaluate.out_dir ({info.data.get('out_dir')}), which every run replaces whole")
        return value


class PromoteParams(Section):
    out_dir: str = "data/promote"
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    alias: str = Field("production", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    # Also publish the model as one SGM-layout .safetensors (ComfyUI, A1111, Forge) in this precision.
    export_single_file: Literal["fp16", "bf16", "fp32"] | None = None


class MarginParams(Section):
    # > 0: at a margin of 0 no number of prompts has the power to show non-inferiority
    aesthetic: float = Field(0.05, gt=0)
    clip_score: float = Field(0.01, gt=0)


class GateParams(Section):
    min_aesthetic_mean: float
    min_clip_score_mean: float
    aesthetic_floor: float = 5.0  # an image scoring under this counts as poor...
    max_share_below_floor: float = Field(0.1, ge=0, le=1)  # ...and at most this share may be poor
    margins: MarginParams = MarginParams()  # non-inferiority against production (or base)
    superiority: Literal["aesthetic", "clip_score"] | None = None  # optionally require a real gain
    # Enough evidence: fewer paired prompts, or less power to detect a margin, is "inconclusive".
    min_prompts: int = Field(10, ge=2)
    min_power: float = Field(0.8, gt=0, lt=1)
    # Training health: the saved weights' held-out loss may be at most this times the base model's on
    # the same images (the model's easel_train.json); null: not checked.
    max_val_loss_ratio: float | None = Field(None, gt=0)


class ReportingParams(Section):
    """Where the stages' metrics (`dvc metrics`), curves and score plots (`dvc plots`) and the logs
    of failed commands go: a second params file gives its own, so its runs leave the project's alone."""

    metrics_dir: str = "data/metrics"  # <stage>.json
    plots_dir: str = "data/plots"  # train/ (dvclive curves), evaluate/scores.csv
    logs_dir: str = ".easel/logs"  # easel-error-*.log: the traceback of an unexpected error


class Params(Section):
    profile: str
    profiles: dict[str, dict[str, Any]] = {}
    models: ModelsParams = ModelsParams()
    storage: StorageParams
    sample_source: SampleSourceParams = SampleSourceParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    download: DownloadParams
    validate_: ValidateParams = Field(alias="validate")
    caption: CaptionParams = CaptionParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams
    promote: PromoteParams
    gate: GateParams
    reporting: ReportingParams = ReportingParams()

    # `validate` shadows a pydantic method name, hence the alias; read it as params.validate_.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def reporting_params(path: str | Path = DEFAULT_PARAMS) -> ReportingParams:
    """A params file's reporting folders; the defaults where it does not load, so a command that
    failed on bad params still logs, and a run that failed on them still gets its summary."""
    try:
        return load_params(path).reporting
    except (ConfigError, OSError):
        return ReportingParams()


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return base with overlay merged in: dicts recursively, everything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_profiles(raw: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Every profile's overlay, checked for shape; the active one must exist."""
    profile, profiles = raw.get("profile"), raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: profiles must be a mapping of profile names to section overrides")
    if profile is not None and profile not in profiles:
        known = ", ".join(sorted(map(str, profiles))) or "none"
        raise ConfigError(f"{source}: profile: {profile!r} is not defined under `profiles:` (known: {known})")
    overlays = {}
    for name, overlay in profiles.items():
        overlay = overlay or {}
        if not isinstance(overlay, dict):
            raise ConfigError(f"{source}: profiles.{name} must be a mapping of section overrides")
        for section in overlay:
            if section in ("profile", "profiles") or section not in SECTIONS:
                known = ", ".join(SECTIONS)
                raise ConfigError(f"{source}: profiles.{name}.{section} is not a section of params (sections: {known})")
        missing = [s for s in PROFILE_SECTIONS if not isinstance(overlay.get(s), dict)]
        if missing:
            raise ConfigError(
                f"{source}: profiles.{name} must set {', '.join(missing)} (dvc.yaml tracks them; use {{}} for none)"
            )
        overlays[str(name)] = overlay
    return overlays


def _in(data: object, loc: tuple) -> bool:
    """Whether the key path `loc` (as pydantic reports it) starts inside the mapping `data`."""
    for part in loc:
        found = part in data if isinstance(data, dict) else isinstance(part, int) and 0 <= part < len(data)
        if not isinstance(data, dict | list) or not found:
            return False
        data = data[part]
    return True


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried (`literal['a']`, `AssumeDpi`, `int`) in the key path."""
    return isinstance(part, str) and (not re.fullmatch(r"[a-z_][a-z0-9_]*", part) or part in ("int", "float", "str"))


def _problems(exc: ValidationError, overlay: dict | None = None, profile: str | None = None) -> list[str]:
    """One text per bad key (a union's alternatives merged), named where it was written."""
    merged: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        if overlay is not None and _in(overlay, loc):
            key = f"profiles.{profile}.{key}"
        if err["type"] == "missing":
            text = "required key is missing"
        elif err["type"] == "extra_forbidden":
            text = "unknown key (typo?)"
        else:
            text = f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
        merged.setdefault(key, [])
        if text not in merged[key]:
            merged[key].append(text)
    return [f"{key}: {' or '.join(texts)}" for key, texts in merged.items()]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Load and validate params.yaml with the active profile applied.

    Everything written is checked, not only what the active profile uses: the base sections on
    their own, and every profile merged over them, so a typo in the inactive profile or a bad base
    value that a profile overrides is found now, not on the day it takes effect. All problems are
    reported in one line, each named where it was written (`profiles.<name>.` for a profile's key).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: not found (run Easel from the project root, or pass --params)") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    missing = [s for s in REQUIRED_SECTIONS if s not in raw]
    if missing:
        raise ConfigError(f"{source}: {', '.join(missing)}: required section(s) missing")
    overlays = _check_profiles(raw, source)
    problems: list[str] = []
    try:
        Params.model_validate(raw)
    except ValidationError as exc:  # keys a profile fills in may be missing here; bad values may not
        required = {k for k in _problems(exc) if k.endswith(": required key is missing")}
        problems += [p for p in _problems(exc) if p not in required]
    active = raw.get("profile")
    chosen = None
    for name in sorted(overlays, key=lambda n: n != active):  # the active profile first
        try:
            params = Params.model_validate(deep_merge(raw, overlays[name]))
        except ValidationError as exc:
            problems += [p for p in _problems(exc, overlays[name], name) if p not in problems]
            continue
        if name == active:
            chosen = params
    if active is None and not problems:
        try:
            chosen = Params.model_validate(raw)
        except ValidationError as exc:
            problems += _problems(exc)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    check_s3_endpoint(os.environ.get(S3_ENDPOINT_ENV), S3_ENDPOINT_ENV)
    return chosen


def check_s3_endpoint(url: str | None, name: str) -> None:
    """An S3 endpoint must be an http(s) URL with a host and, if any, a valid port."""
    from urllib.parse import urlsplit

    if not url:
        return
    hint = "e.g. https://s3.example.com or http://127.0.0.1:9000"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ConfigError(f"{name}={url!r} is not a valid URL ({exc}); {hint}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={url!r} is not an http(s) URL with a host; {hint}")
    if port == 0:
        raise ConfigError(f"{name}={url!r} has port 0; {hint}")


def effective_params_yaml(params: Params) -> str:
    """The effective parameters as YAML, profile applied (what `easel config show` prints)."""
    data = params.model_dump(by_alias=True, exclude={"profiles"})
    return yaml.safe_dump(data, sort_keys=False)
