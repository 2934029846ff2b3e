"""The embedded S3 server (a real SeaweedFS on loopback) and the S3 client around it."""

import os

import pytest

from components.config import StorageParams
from components.storage import (
    EmbeddedS3,
    S3Settings,
    StorageUnavailable,
    ensure_bucket,
    make_client,
    ready_client,
    resolve_settings,
    storage_errors,
)
from tests.conftest import free_port_block


def test_round_trip_with_credentials(s3_client):
    bucket = s3_client.bucket_name
    s3_client.put_object(Bucket=bucket, Key="a/b.bin", Body=b"\x00easel\xff")
    assert s3_client.get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == b"\x00easel\xff"
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a/b.bin"]


def test_wrong_secret_is_refused_with_a_clear_message(s3_server, s3_client):
    good = s3_server.settings()
    bad = S3Settings(good.endpoint_url, good.access_key, "not-the-secret", embedded=True)
    client = make_client(bad, retries=0)
    with pytest.raises(StorageUnavailable, match="refused the credentials"), storage_errors(bad, "probe"):
        client.list_objects_v2(Bucket=s3_client.bucket_name)


def test_unreachable_endpoint_names_it(monkeypatch):
    monkeypatch.setenv("EASEL_S3_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage = StorageParams(bucket="easel")
    with pytest.raises(StorageUnavailable, match=r"http://127\.0\.0\.1:9 is unreachable"):
        ready_client(storage)


def test_credentials_never_show_in_repr(s3_server):
    settings = s3_server.settings()
    assert settings.secret_key not in repr(settings) and settings.secret_key not in str(settings)


def test_the_server_keeps_its_logs_in_its_own_folder(s3_server):
    """SeaweedFS writes its log files under the server's data folder (.easel/s3/logs in a project),
    not as /tmp/weed.* where every project's would mix."""
    logs = s3_server.data_dir / "logs"
    assert logs.is_dir() and any(p.name.startswith("weed") for p in logs.iterdir())


def test_start_reuses_a_running_server(s3_server):
    again = EmbeddedS3(data_dir=s3_server.data_dir, port=s3_server.port)
    assert again.start() is False  # already running: reused, not restarted
    assert again.is_running()


def test_embedded_is_used_without_endpoint_env(monkeypatch, tmp_path):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    storage = StorageParams(bucket="easel", embedded={"port": 8333, "data_dir": str(tmp_path / "s3")})
    # A reader of a server never started here is told to start it, and nothing is written.
    with pytest.raises(StorageUnavailable, match=r"has never been started .*easel s3 start"):
        resolve_settings(storage)
    assert not (tmp_path / "s3").exists()
    EmbeddedS3.from_params(storage).credentials(create=True)  # what a start does first
    settings = resolve_settings(storage)
    assert settings.embedded and settings.endpoint_url == "http://127.0.0.1:8333"
    assert (tmp_path / "s3" / "credentials.json").stat().st_mode & 0o777 == 0o600


def test_port_taken_by_another_program(tmp_path):
    import socket

    port = free_port_block()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        with pytest.raises(StorageUnavailable, match=f"port {port} .* is taken"):
            EmbeddedS3(data_dir=tmp_path, port=port).start()


def external(monkeypatch, url: str, secret: str = "y") -> StorageParams:
    monkeypatch.setenv("EASEL_S3_ENDPOINT", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return StorageParams(bucket="easel", read_timeout_s=1, connect_timeout_s=1, retries=0)


@pytest.mark.parametrize("status", [200, 404])
def test_an_endpoint_that_answers_http_but_is_not_s3_is_named(monkeypatch, status):
    from tests.fault_servers import NotS3Server

    with NotS3Server(status) as server:
        storage = external(monkeypatch, server.url)
        with pytest.raises(StorageUnavailable, match=r"is it an S3 server\?"):
            ready_client(storage)
        with pytest.raises(StorageUnavailable, match=r"is it an S3 server\?"):
            ready_client(storage, create_bucket=False)


def test_a_hanging_endpoint_fails_within_its_bounded_wait(monkeypatch):
    from tests.fault_servers import HangingServer

    with HangingServer() as server:
        storage = external(monkeypatch, server.url)
        with pytest.raises(StorageUnavailable, match=r"did not answer within 1 s \(1 tries"):
            ready_client(storage)


def test_the_default_waits_bound_a_hanging_endpoint_to_30_seconds(monkeypatch, tmp_path):
    """No timing assert: the client's configuration is what bounds the wait (botocore enforces it)."""
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    storage = StorageParams(bucket="easel", embedded={"data_dir": str(tmp_path)})
    EmbeddedS3.from_params(storage).credentials(create=True)
    settings = resolve_settings(storage)
    config = make_client(settings).meta.config
    tries = config.retries["total_max_attempts"]
    assert config.connect_timeout and config.read_timeout
    assert tries * (config.connect_timeout + config.read_timeout) <= 30


def test_a_malformed_endpoint_is_refused_before_any_call(monkeypatch):
    from components.plumbing.errors import ConfigError

    with pytest.raises(ConfigError, match=r"EASEL_S3_ENDPOINT='not-a-url' is not an http\(s\) URL"):
        external(monkeypatch, "not-a-url") and ready_client(StorageParams(bucket="easel"))


def test_broken_credentials_file_is_named(tmp_path):
    server = EmbeddedS3(data_dir=tmp_path, port=free_port_block())
    for content in ('{"access_key": "a"', '{"access_key": "a"}', "[]", '{"access_key": "", "secret_key": "s"}'):
        server.credentials_file.write_text(content)
        with pytest.raises(StorageUnavailable, match=r"credentials.json: not usable embedded S3 credentials"):
            server.settings()


def test_start_after_a_port_change_does_not_trust_another_program(s3_server, tmp_path):
    import socket

    moved = EmbeddedS3(data_dir=s3_server.data_dir, port=free_port_block())  # params now name another port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", moved.port))
        sock.listen()  # ... which another program holds
        assert not moved.is_running()
        with pytest.raises(StorageUnavailable, match=rf"runs on port {s3_server.port} .*not on storage.embedded.port"):
            moved.start()
    assert s3_server.is_running()  # the running server is left alone


def test_the_server_holds_more_buckets_than_one_per_free_gigabyte(s3_server):
    # The suite's server once refused every write after 18 buckets on a disk with 19 GB free (weed
    # mini sized its volume count as free disk / 1 GB, one volume per bucket). A user's projects,
    # registries and remotes share one server the same way; 40 buckets hit the old limit here.
    client = make_client(s3_server.settings())
    buckets = [f"many-{os.urandom(3).hex()}-{i:02d}" for i in range(40)]
    for i, bucket in enumerate(buckets):
        ensure_bucket(client, bucket)
        client.put_object(Bucket=bucket, Key="k", Body=f"object {i}".encode())
    for i, bucket in enumerate(buckets):
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == f"object {i}".encode()
    for bucket in buckets:
        client.delete_object(Bucket=bucket, Key="k")
        client.delete_bucket(Bucket=bucket)


def test_a_server_side_failure_says_where_to_look():
    """An S3 InternalError (the embedded server answered it for every write once its volumes ran
    out) names the server's log and the likely cause; a throttling answer is worth a retry. The
    error is built by hand: making the real server fail on demand would need a full disk."""
    from botocore.exceptions import ClientError

    def failing(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code, "Message": "We encountered an internal error."}}
        return ClientError(response | {"ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    embedded = S3Settings("http://127.0.0.1:8333", embedded=True)
    with pytest.raises(StorageUnavailable) as caught, storage_errors(embedded, "put s3://b/k"):
        raise failing("InternalError", 500)
    assert "InternalError" in str(caught.value) and "data_dir>/logs" in str(caught.value)
    assert "free disk" in str(caught.value) and not caught.value.transient
    with pytest.raises(StorageUnavailable) as caught, storage_errors(S3Settings("https://s3.example"), "put"):
        raise failing("SlowDown", 503)
    assert "the server's own log says why" in str(caught.value) and caught.value.transient
