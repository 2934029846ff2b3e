"""The embedded S3 server (a real SeaweedFS on loopback) and the S3 client around it."""

import pytest

from components.config import StorageParams
from components.storage import (
    EmbeddedS3,
    S3Settings,
    StorageUnavailable,
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


def test_start_reuses_a_running_server(s3_server):
    again = EmbeddedS3(data_dir=s3_server.data_dir, port=s3_server.port)
    assert again.start() is False  # already running: reused, not restarted
    assert again.is_running()


def test_embedded_is_used_without_endpoint_env(monkeypatch, tmp_path):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    storage = StorageParams(bucket="easel", embedded={"port": 8333, "data_dir": str(tmp_path / "s3")})
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
