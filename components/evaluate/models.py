"""The models an evaluation compares: the candidate, the production model, the base model.

Each has a name, a loadable reference and an identity for the image cache: a content
fingerprint for a local folder, the registry version for production, the hub id and revision
for a hub model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from components.config import ModelsParams, PromoteParams, StorageParams
from components.fsutil import dir_manifest, manifest_digest

log = logging.getLogger(__name__)

REGISTRY_CACHE = Path(".easel/cache/registry")


@dataclass(frozen=True)
class ModelUnderTest:
    name: str  # candidate | production | base
    ref: str  # a pipeline folder or a hub id
    identity: str  # what the image cache keys on
    version: str | None = None  # the registry version, for production


def folder_fingerprint(folder: Path) -> str:
    return manifest_digest(dir_manifest(folder))


def candidate(model_dir: Path) -> ModelUnderTest:
    return ModelUnderTest("candidate", str(model_dir), "sha256:" + folder_fingerprint(model_dir))


def base(models: ModelsParams) -> ModelUnderTest:
    from components.models.loaders import resolve_ref

    models.require("sdxl")
    ref = resolve_ref(models.sdxl, "sdxl")
    if Path(ref).is_dir():
        identity = "sha256:" + folder_fingerprint(Path(ref))
    elif Path(ref).is_file():  # a single-file checkpoint, read with the configs of models.sdxl_config
        from components.fsutil import sha256_file

        identity = f"sha256:{sha256_file(ref)}+config:{models.sdxl_config}"
    else:
        identity = f"hub:{ref}@{models.revision or 'main'}:{models.variant or ''}"
    if models.vae:
        identity += f"+vae:{models.vae}"
    return ModelUnderTest("base", ref, identity)


def production(
    storage: StorageParams, promote: PromoteParams, cache_root: Path = REGISTRY_CACHE
) -> ModelUnderTest | None:
    """The model the alias (production) points at, downloaded (and verified) once; None if none yet."""
    from components.registry import Registry
    from components.storage import ready_client

    # Checked to answer as S3 first: an endpoint that is down or not S3 is an error, never "no production yet".
    settings, client = ready_client(storage, create_bucket=False)
    registry = Registry(client, settings, storage.bucket, storage.registry_prefix)
    alias = registry.alias(promote.model_name, promote.alias)
    if alias is None:
        log.info("no %s model in the registry yet: comparing with the base model only", promote.alias)
        return None
    version = alias["version"]
    folder = cache_root / promote.model_name / version
    if (folder / "model_index.json").is_file():
        manifest = registry.manifest(promote.model_name, version) or {}
    else:
        manifest = registry.download(promote.model_name, version, folder)
    # The fingerprint the model had as a candidate: its cached images are production's now.
    fingerprint = manifest.get("model_fingerprint")
    identity = f"sha256:{fingerprint}" if fingerprint else f"registry:{promote.model_name}/{version}"
    return ModelUnderTest("production", str(folder), identity, version)
