"""The models an evaluation generates with: the candidate, the production model, the base model, and
the panel (`evaluate.panel`: any other models to score beside them).

Each has a name, a loadable reference and an identity for the image cache and the leaderboard: a
content fingerprint for a local folder or file, the fingerprint a registry version was promoted
with, the hub id and revision for a hub model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

from components.config import REGISTRY_REF, ModelsParams, PanelModelParams, PromoteParams, StorageParams
from components.plumbing.errors import ConfigError
from components.plumbing.fsutil import model_fingerprint, sha256_file

log = logging.getLogger(__name__)

REGISTRY_CACHE = Path(".easel/cache/registry")


@dataclass(frozen=True)
class ModelUnderTest:
    name: str  # candidate | production | base | a panel model's name
    ref: str  # a pipeline folder, a single-file checkpoint or a hub id
    # The identity, or what computes it from the weights: read when first asked for, so that an
    # evaluate shard reads only the weights of the models it generates with.
    identity_of: str | Callable[[], str] = field(compare=False, repr=False)
    version: str | None = None  # the registry version, for production and registry panel models
    # How a hub id or a single file is read (configs, VAE override); None: a diffusers folder, as it is.
    load_with: ModelsParams | None = None
    origin: str = ""  # what params.yaml named, for the leaderboard's `ref` column

    @cached_property
    def identity(self) -> str:
        """What the image cache and the leaderboard key on."""
        return self.identity_of if isinstance(self.identity_of, str) else self.identity_of()


def single_file_identity(path: Path | str, config: str | None) -> str:
    """A single-file checkpoint's identity: its bytes and the configs it is read with."""
    return f"sha256:{sha256_file(path)}+config:{config}"


def folder_identity(folder: Path) -> str:
    return "sha256:" + model_fingerprint(folder)


def candidate(model_dir: Path) -> ModelUnderTest:
    return ModelUnderTest("candidate", str(model_dir), partial(folder_identity, model_dir), origin=str(model_dir))


def base(models: ModelsParams) -> ModelUnderTest:
    from components.models.loaders import resolve_ref

    models.require("sdxl")
    ref = resolve_ref(models.sdxl, "sdxl")
    vae = f"+vae:{models.vae}" if models.vae else ""

    def identity() -> str:
        if Path(ref).is_dir():
            return folder_identity(Path(ref)) + vae
        if Path(ref).is_file():  # a single-file checkpoint, read with the configs of models.sdxl_config
            return single_file_identity(ref, models.sdxl_config) + vae
        return f"hub:{ref}@{models.revision or 'main'}:{models.variant or ''}" + vae

    return ModelUnderTest("base", ref, identity, load_with=models, origin=models.sdxl or "")


def _registry(storage: StorageParams):
    from components.release.registry import Registry
    from components.storage import ready_client

    # Checked to answer as S3 first: an endpoint that is down or not S3 is an error, never "no production yet".
    settings, client = ready_client(storage, create_bucket=False)
    return Registry(client, settings, storage.bucket, storage.registry_prefix)


def _registry_version(registry, name: str, model_name: str, version: str, cache_root: Path) -> ModelUnderTest:
    """A complete registry version, downloaded (every sha256 checked) once into cache_root."""
    folder = cache_root / model_name / version
    if (folder / "model_index.json").is_file():
        manifest = registry.manifest(model_name, version) or {}
    else:
        manifest = registry.download(model_name, version, folder)
    # The fingerprint the model had as a candidate: the images cached for it then are this model's.
    fingerprint = manifest.get("model_fingerprint")
    identity = f"sha256:{fingerprint}" if fingerprint else f"registry:{model_name}/{version}"
    return ModelUnderTest(name, str(folder), identity, version, origin=f"registry:{model_name}/{version}")


def production(
    storage: StorageParams, promote: PromoteParams, cache_root: Path = REGISTRY_CACHE
) -> ModelUnderTest | None:
    """The model the alias (production) points at, downloaded (and verified) once; None if none yet."""
    registry = _registry(storage)
    alias = registry.alias(promote.model_name, promote.alias)
    if alias is None:
        log.info("no %s model in the registry yet: comparing with the base model only", promote.alias)
        return None
    return _registry_version(registry, "production", promote.model_name, alias["version"], cache_root)


def panel_model(
    entry: PanelModelParams,
    index: int,
    models: ModelsParams,
    storage: StorageParams | None,
    cache_root: Path = REGISTRY_CACHE,
) -> ModelUnderTest:
    """A panel entry as a model to generate with; a reference that names nothing usable is a ConfigError."""
    key = f"params.yaml: evaluate.panel[{index}]"
    if match := re.match(REGISTRY_REF, entry.ref):
        if storage is None:
            raise ConfigError(f"{key}.ref: {entry.ref} needs the storage settings (run through `easel`)")
        model_name, wanted = match.groups()
        registry = _registry(storage)
        version = wanted
        if registry.manifest(model_name, wanted) is None:  # not a version: an alias, or nothing
            alias = registry.alias(model_name, wanted)
            if alias is None:
                raise ConfigError(f"{key}.ref: the registry has no version or alias {wanted!r} of {model_name!r}")
            version = alias["version"]
        return _registry_version(registry, entry.name, model_name, version, cache_root)
    path = Path(entry.ref)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"{key}.ref: {entry.ref} is a folder but not a diffusers pipeline (no model_index.json)")
        return ModelUnderTest(entry.name, str(path.resolve()), partial(folder_identity, path), origin=entry.ref)
    if path.is_file():
        if path.suffix != ".safetensors":
            # A .ckpt or .pt is a pickle, which can run code when it is loaded.
            raise ConfigError(f"{key}.ref: {entry.ref}: only .safetensors single files are read (convert it first)")
        config = entry.config or models.sdxl_config
        if not config:
            raise ConfigError(
                f"{key}.config: {entry.ref} is a single file; name the diffusers configs it is read with "
                "(here or in models.sdxl_config)"
            )
        # As published: the file's own VAE, not the models.vae override meant for the base model.
        load_with = models.model_copy(update={"sdxl_config": config, "vae": None})
        identity = partial(single_file_identity, path, config)
        return ModelUnderTest(entry.name, str(path.absolute()), identity, load_with=load_with, origin=entry.ref)
    raise ConfigError(
        f"{key}.ref: {entry.ref!r} is not a diffusers folder, a .safetensors file or registry:<model_name>/<version>"
    )
