"""The model registry in S3.

Layout under s3://<bucket>/<registry_prefix>/models/<name>/:
  versions/<version>/files/...      the diffusers pipeline files
  versions/<version>/<extra>        model card, evaluation summary, decision record
  versions/<version>/manifest.json  sha256 and size of every file, written LAST
  aliases/<alias>.json              {"version": ..., "history": [...]}, one PUT

A version exists only once its manifest does, and the manifest is written after every file was
uploaded and verified, so a reader never sees a half-written version. An alias is one small
object replaced in a single PUT after the version is complete, so it never points at a
half-written model; earlier targets are kept in its history.
The version id is derived from the content (the hash of the file manifest): promoting the same
model twice reuses the version.

Production is always whole: a publish holds a lease (versions/<version>/publishing.json, renewed as
it goes) that garbage collection respects, and checks every object before it writes the manifest;
an alias moves (promote, rollback, by hand) only to a version whose every file is there with its
size and sha256; `check_whole` and `verify` say what a version lacks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from components.config import PICKLE_SUFFIXES
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_dir, dir_manifest, manifest_digest, sha256_file
from components.storage import S3Settings, storage_errors

ALIAS_HISTORY = 20
LEASE = "publishing.json"  # beside a version's files while a publish of it runs
LEASE_S = 3600.0  # a lease not renewed for this long belongs to a publish that died

log = logging.getLogger(__name__)


class ConcurrentAliasUpdate(EaselError):
    """The alias moved between reading it and writing it."""


def _refuse_unsafe_path(where: str, path: str) -> None:
    """A version holds relative paths inside its folder, and no pickle (a file that runs code when a
    library loads it): a model folder is published and fetched with safetensors weights only."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\\" in path or ".." in parts:
        raise EaselError(f"{where}: file path {path!r} leaves the version's folder; refused")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise EaselError(f"{where}: {path} is a pickle file, which can run code when loaded; refused")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Registry:
    client: object
    settings: S3Settings
    bucket: str
    prefix: str

    def model_prefix(self, name: str) -> str:
        return f"{self.prefix.strip('/')}/models/{name}"

    def version_prefix(self, name: str, version: str) -> str:
        return f"{self.model_prefix(name)}/versions/{version}"

    def alias_key(self, name: str, alias: str) -> str:
        return f"{self.model_prefix(name)}/aliases/{alias}.json"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- reading -------------------------------------------------------------------------------

    def _get_json_etag(self, key: str) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        with storage_errors(self.settings, f"registry read {key}"):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=key)
                body, etag = obj["Body"].read(), obj.get("ETag")
            except ClientError as exc:
                # Only an S3 error document says "absent"; a bare 404 may come from a server that is not S3.
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket"):
                    return None, None
                raise
        try:
            return json.loads(body), etag
        except json.JSONDecodeError:
            raise EaselError(f"registry: {self.uri(key)} is not valid JSON") from None

    def _get_json(self, key: str) -> dict | None:
        return self._get_json_etag(key)[0]

    def manifest(self, name: str, version: str) -> dict | None:
        return self._get_json(f"{self.version_prefix(name, version)}/manifest.json")

    def alias(self, name: str, alias: str) -> dict | None:
        return self._get_json(self.alias_key(name, alias))

    def aliases(self, name: str) -> dict[str, dict]:
        """Every alias of `name` (production, staging, ...) and its record."""
        prefix = f"{self.model_prefix(name)}/aliases/"
        found = {}
        with storage_errors(self.settings, "registry aliases"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    alias = obj["Key"][len(prefix) :].removesuffix(".json")
                    record = self.alias(name, alias)
                    if record:
                        found[alias] = record
        return found

    def list_versions(self, name: str) -> list[dict]:
        """Complete versions (those with a manifest), oldest first."""
        prefix = f"{self.model_prefix(name)}/versions/"
        versions = []
        with storage_errors(self.settings, "registry list"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/manifest.json") and obj["Key"].count("/") == prefix.count("/") + 1:
                        version = obj["Key"][len(prefix) :].split("/")[0]
                        manifest = self.manifest(name, version)
                        if manifest:
                            versions.append(manifest)
        return sorted(versions, key=lambda m: m.get("created_at", ""))

    def _object_problem(self, key: str, entry: dict) -> str | None:
        """Why the object at `key` is not the manifest's entry (missing, another size or sha256); None if it is."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return f"{entry['path']}: missing"
            raise
        if head["ContentLength"] != entry["bytes"]:
            return f"{entry['path']}: {head['ContentLength']} bytes, not {entry['bytes']}"
        if head.get("Metadata", {}).get("sha256") != entry["sha256"]:
            return f"{entry['path']}: not the sha256 its manifest names"
        return None

    def _entries(self, name: str, manifest: dict) -> list[tuple[str, dict]]:
        """(key, manifest entry) of every object a complete version holds."""
        base = self.version_prefix(name, manifest["version"])
        files = [(f"{base}/files/{entry['path']}", entry) for entry in manifest.get("files", [])]
        return files + [(f"{base}/{entry['path']}", entry) for entry in manifest.get("extras", [])]

    def check_whole(self, name: str, version: str) -> list[str]:
        """What keeps `version` from being whole: no manifest, or files missing, short or not the ones
        listed (by size and the sha256 stored with each object). Empty: every file is there."""
        manifest = self.manifest(name, version)
        if manifest is None:
            return [f"{version}: no manifest (the version does not exist or its publish never finished)"]
        with storage_errors(self.settings, f"registry check {name}/{version}"):
            problems = [self._object_problem(key, entry) for key, entry in self._entries(name, manifest)]
        return [p for p in problems if p]

    def verify(self, name: str, version: str) -> list[str]:
        """check_whole, then every file read back and hashed: what the stored bytes are, not what their
        metadata says. Empty: the version is whole."""
        import hashlib

        problems = self.check_whole(name, version)
        if problems:
            return problems
        manifest = self.manifest(name, version)
        with storage_errors(self.settings, f"registry verify {name}/{version}"):
            for key, entry in self._entries(name, manifest):
                digest = hashlib.sha256()
                for chunk in self.client.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(1 << 20):
                    digest.update(chunk)
                if digest.hexdigest() != entry["sha256"]:
                    problems.append(f"{entry['path']}: its bytes do not hash to the manifest's sha256")
        return problems

    def require_whole(self, name: str, version: str, purpose: str) -> None:
        """Refuse (EaselError) a version that is not whole, naming what it lacks."""
        problems = self.check_whole(name, version)
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise EaselError(
                f"registry: {name}/{version} is not whole ({'; '.join(problems[:3])}{more}); refusing to {purpose}. "
                f"`easel registry verify {version}` checks it; publish it again to repair it"
            )

    # -- writing -------------------------------------------------------------------------------

    def _lease(self, base: str) -> None:
        """Hold (or renew) the publish lease of the version under `base`: gc leaves the version alone."""
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=LEASE_S)
        body = json.dumps({"expires_at": expires.isoformat(timespec="seconds")}).encode()
        self.client.put_object(Bucket=self.bucket, Key=f"{base}/{LEASE}", Body=body, ContentType="application/json")

    def _leased(self, base: str) -> bool:
        """A publish of this version is running (its lease has not expired)."""
        record = self._get_json(f"{base}/{LEASE}")
        try:
            return dt.datetime.fromisoformat(record["expires_at"]) > dt.datetime.now(dt.UTC)
        except (TypeError, KeyError, ValueError):
            return False

    def _already_there(self, key: str, sha256: str, size: int) -> bool:
        """An object from an earlier, interrupted publish that is already complete and verified."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return False
        return head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256

    def _upload_verified(self, path: Path, key: str, sha256: str, size: int) -> None:
        from boto3.s3.transfer import TransferConfig

        if self._already_there(key, sha256, size):
            return
        # Multipart above 64 MiB; each part carries a SHA-256 checksum that the server checks.
        config = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha256}},
                Config=config,
            )
        except BaseException:
            self._abort_uploads(key)  # no half-uploaded parts left behind (if the server can still hear us)
            raise
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
            raise EaselError(f"registry: upload of {path} to {self.uri(key)} did not verify")

    def _abort_uploads(self, key: str) -> None:
        """Abort the pending multipart uploads of `key`; best effort (a dead server leaves them to gc)."""
        try:
            pending = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key).get("Uploads", [])
            for upload in pending:
                if upload["Key"] == key:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])
        except Exception:  # the upload's own error is the one to report
            log.warning("could not abort the pending uploads of %s; `easel registry gc` will", self.uri(key))

    def publish(self, name: str, model_dir: Path, extras: dict[str, Path], metadata: dict) -> dict:
        """Upload a model folder plus extra files as a complete version; returns its manifest.

        Idempotent: an existing complete version with the same content is returned as is. A run
        killed part-way leaves no manifest, so the version does not exist until a retry finishes.
        """
        import time

        files = dir_manifest(model_dir)
        if not files:
            raise EaselError(f"registry: {model_dir} holds no files to publish")
        for entry in files:
            _refuse_unsafe_path(f"registry: {model_dir}", entry["path"])
        version = "v-" + manifest_digest(files)[:16]
        existing = self.manifest(name, version)
        if existing and not self.check_whole(name, version):
            return existing
        # (A manifest whose files went missing: published again, which puts them back.)
        base = self.version_prefix(name, version)
        with storage_errors(self.settings, f"registry publish {name}/{version}"):
            self._lease(base)  # before anything else: gc leaves this version's objects alone from now on
            renewed = time.monotonic()
            extra_entries = [
                {"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                for rel, path in sorted(extras.items())
            ]
            uploads = [(model_dir / e["path"], f"{base}/files/{e['path']}", e) for e in files]
            uploads += [(extras[e["path"]], f"{base}/{e['path']}", e) for e in extra_entries]
            for path, key, entry in uploads:
                if time.monotonic() - renewed > LEASE_S / 4:
                    self._lease(base)
                    renewed = time.monotonic()
                self._upload_verified(path, key, entry["sha256"], entry["bytes"])
            # Objects found already there (an earlier, interrupted publish) may have gone since: every
            # one is checked again, and put back, before the manifest makes the version exist.
            for path, key, entry in uploads:
                if self._object_problem(key, entry):
                    self._upload_verified(path, key, entry["sha256"], entry["bytes"])
            manifest = {
                "name": name,
                "version": version,
                "created_at": _now(),
                "files": files,
                "extras": extra_entries,
                **metadata,
            }
            self.client.put_object(
                Bucket=self.bucket,
                Key=f"{base}/manifest.json",
                Body=json.dumps(manifest, indent=2).encode(),
                ContentType="application/json",
            )
            self.client.delete_object(Bucket=self.bucket, Key=f"{base}/{LEASE}")
        return manifest

    def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        reason: str,
        expected_version: str | None = None,
        check_expected: bool = False,
    ) -> dict:
        """Point an alias at a complete version in one conditional PUT; the previous target goes to
        history. With `check_expected`, refuse if the alias no longer points at `expected_version`
        (None: no alias yet), i.e. someone else
        moved it since the decision was made). Two writers racing: one wins, the other gets
        ConcurrentAliasUpdate; the alias is one object, so it is never torn."""
        from botocore.exceptions import ClientError

        if self.manifest(name, version) is None:
            raise EaselError(f"registry: {name} has no complete version {version}; refusing to point {alias} at it")
        self.require_whole(name, version, f"point {alias} at it")
        key = self.alias_key(name, alias)
        current, etag = self._get_json_etag(key)
        current = current or {"history": []}
        if check_expected and current.get("version") != expected_version:
            raise ConcurrentAliasUpdate(
                f"registry: {name}@{alias} is now {current.get('version')}, not {expected_version} as when the "
                "decision was made; re-run the evaluation against the new production"
            )
        history = list(current.get("history", []))
        if current.get("version"):
            history.insert(0, {k: current[k] for k in ("version", "updated_at", "reason") if k in current})
        record = {
            "name": name,
            "alias": alias,
            "version": version,
            "updated_at": _now(),
            "reason": reason,
            "history": history[:ALIAS_HISTORY],
        }
        # Compare-and-swap: only if the alias is still the object we read (or still absent).
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        with storage_errors(self.settings, f"registry alias {name}@{alias}"):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=json.dumps(record, indent=2).encode(),
                    ContentType="application/json",
                    **condition,
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed",
                    "412",
                    "ConditionalRequestConflict",
                ):
                    raise ConcurrentAliasUpdate(
                        f"registry: {name}@{alias} was changed by someone else while this update ran; "
                        "nothing was changed by this one"
                    ) from None
                raise
        return record

    def rollback(self, name: str, alias: str, to_version: str | None = None) -> dict:
        """Point the alias back at its previous version (or `to_version`, which must be complete)."""
        current = self.alias(name, alias)
        if current is None:
            raise EaselError(f"registry: {name} has no alias {alias!r} to roll back")
        if to_version is None:
            previous = [h["version"] for h in current.get("history", []) if h["version"] != current["version"]]
            if not previous:
                raise EaselError(f"registry: {name}@{alias} has no earlier version to roll back to")
            to_version = previous[0]
        return self.set_alias(
            name, alias, to_version, f"rollback from {current['version']}", current["version"], check_expected=True
        )

    def download(self, name: str, version_or_alias: str, dest: Path) -> dict:
        """Download a version (or an alias's version) into dest, verifying every sha256."""
        manifest = self.manifest(name, version_or_alias)
        if manifest is None:
            alias = self.alias(name, version_or_alias)
            if alias is None:
                raise EaselError(f"registry: {name} has no version or alias {version_or_alias!r}")
            manifest = self.manifest(name, alias["version"])
            if manifest is None:
                raise EaselError(f"registry: alias {version_or_alias} points at missing version {alias['version']}")
        base = self.version_prefix(name, manifest["version"])
        for entry in manifest["files"]:  # what a manifest says is data: checked before anything is fetched
            _refuse_unsafe_path(f"registry: {name}/{manifest['version']} manifest", entry["path"])
        with atomic_dir(dest) as tmp, storage_errors(self.settings, f"registry download {name}"):
            for entry in manifest["files"]:
                target = tmp / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, f"{base}/files/{entry['path']}", str(target))
                if sha256_file(target) != entry["sha256"]:
                    raise EaselError(
                        f"registry: {name}/{manifest['version']} file {entry['path']} does not match its "
                        "manifest sha256 (corrupted in storage); refusing it"
                    )
        return manifest

    # -- garbage ---------------------------------------------------------------------------------

    def garbage(self, name: str, older_than_s: float = 24 * 3600) -> Garbage:
        """What no complete version or alias references: objects of versions that never got their
        manifest (an interrupted publish), objects of complete versions that their manifest does not
        list, and pending multipart uploads; only those older than `older_than_s`, so a publish
        running right now is left alone."""
        now = dt.datetime.now(dt.UTC)
        prefix = f"{self.model_prefix(name)}/versions/"
        found = Garbage()
        with storage_errors(self.settings, f"registry gc {name}"):
            by_version: dict[str, list[dict]] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    by_version.setdefault(obj["Key"][len(prefix) :].split("/")[0], []).append(obj)
            for version, objects in sorted(by_version.items()):
                manifest = self.manifest(name, version)
                if manifest is None and self._leased(f"{prefix}{version}"):
                    continue  # a publish of it is running: its objects are not orphans
                if manifest is None:
                    keep: set[str] = set()
                else:
                    base = f"{prefix}{version}"
                    keep = {f"{base}/manifest.json"}
                    keep |= {f"{base}/files/{entry['path']}" for entry in manifest.get("files", [])}
                    keep |= {f"{base}/{entry['path']}" for entry in manifest.get("extras", [])}
                for obj in objects:
                    if obj["Key"] not in keep and (now - obj["LastModified"]).total_seconds() >= older_than_s:
                        found.objects.append(obj["Key"])
                        found.bytes += obj.get("Size", 0)
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
            for upload in uploads:
                if (now - upload["Initiated"]).total_seconds() >= older_than_s:
                    found.uploads.append((upload["Key"], upload["UploadId"]))
        return found

    def collect(self, name: str, garbage: Garbage) -> None:
        """Delete what `garbage` found."""
        with storage_errors(self.settings, f"registry gc {name}"):
            for key, upload_id in garbage.uploads:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            for start in range(0, len(garbage.objects), 1000):  # DeleteObjects takes 1000 keys at a time
                batch = [{"Key": key} for key in garbage.objects[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


@dataclass
class Garbage:
    objects: list[str] = field(default_factory=list)
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (key, upload id)
    bytes: int = 0
