"""The S3 model registry and the promotion gate, against a real SeaweedFS on loopback."""

import json
import math

import pytest

from components.config import PromoteParams, StorageParams
from components.errors import EaselError, GateRejected
from components.promote import gate, run_promote
from components.registry import Registry


@pytest.fixture()
def registry(s3_server, s3_client):
    return Registry(s3_client, s3_server.settings(), s3_client.bucket_name, "registry")


def make_model(folder, content: bytes = b"weights"):
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(content)
    return folder


def summary_for(model_dir, aesthetic=6.2, clip=0.28):
    from components.evaluate.models import folder_fingerprint as model_fingerprint

    return {
        "aesthetic": {"mean": aesthetic, "std": 0.2},
        "clip_score": {"mean": clip, "std": 0.02},
        "model_fingerprint": model_fingerprint(model_dir),
    }


def test_publish_writes_manifest_last_and_is_idempotent(registry, tmp_path):
    model = make_model(tmp_path / "m")
    first = registry.publish("posters", model, {}, {})
    again = registry.publish("posters", model, {}, {})
    assert first["version"] == again["version"]  # content-addressed: same model, same version
    assert [v["version"] for v in registry.list_versions("posters")] == [first["version"]]
    paths = {f["path"] for f in first["files"]}
    assert paths == {"model_index.json", "unet/diffusion_pytorch_model.safetensors"}


def test_a_version_without_manifest_does_not_exist(registry, tmp_path):
    model = make_model(tmp_path / "m")
    manifest = registry.publish("posters", model, {}, {})
    key = f"{registry.version_prefix('posters', manifest['version'])}/manifest.json"
    registry.client.delete_object(Bucket=registry.bucket, Key=key)  # as if killed before the manifest
    assert registry.list_versions("posters") == []
    with pytest.raises(EaselError, match="no complete version"):
        registry.set_alias("posters", "production", manifest["version"], "test")


def test_alias_keeps_history(registry, tmp_path):
    v1 = registry.publish("posters", make_model(tmp_path / "a", b"one"), {}, {})["version"]
    v2 = registry.publish("posters", make_model(tmp_path / "b", b"two"), {}, {})["version"]
    registry.set_alias("posters", "production", v1, "first")
    record = registry.set_alias("posters", "production", v2, "second")
    assert record["version"] == v2
    assert record["history"][0]["version"] == v1


def test_download_verifies_and_refuses_a_corrupted_file(registry, tmp_path):
    model = make_model(tmp_path / "m")
    version = registry.publish("posters", model, {}, {})["version"]
    registry.set_alias("posters", "production", version, "test")
    registry.download("posters", "production", tmp_path / "out")
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"
    key = f"{registry.version_prefix('posters', version)}/files/unet/diffusion_pytorch_model.safetensors"
    registry.client.put_object(Bucket=registry.bucket, Key=key, Body=b"tampered")
    with pytest.raises(EaselError, match=r"unet/diffusion_pytorch_model\.safetensors does not match"):
        registry.download("posters", version, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # nothing half-downloaded is left


def params(tmp_path, **kw) -> PromoteParams:
    base = {
        "out_dir": str(tmp_path / "promote"),
        "model_name": "posters",
        "min_aesthetic_mean": 6.0,
        "min_clip_score_mean": 0.25,
    }
    return PromoteParams(**(base | kw))


def test_gate_rules():
    p = PromoteParams(model_name="m", min_aesthetic_mean=6.0, min_clip_score_mean=0.25)
    ok = {"aesthetic": {"mean": 6.1}, "clip_score": {"mean": 0.3}, "model_fingerprint": "f"}
    assert all(r.passed for r in gate(ok, p, "f"))
    low = {"aesthetic": {"mean": 5.9}, "clip_score": {"mean": 0.3}, "model_fingerprint": "f"}
    assert [r.rule for r in gate(low, p, "f") if not r.passed] == ["aesthetic_mean"]
    nan = {"aesthetic": {"mean": math.nan}, "clip_score": {"mean": 0.3}, "model_fingerprint": "f"}
    assert [r.note for r in gate(nan, p, "f") if not r.passed] == ["NaN"]
    missing = {"aesthetic": {}, "clip_score": {"mean": "high"}, "model_fingerprint": "f"}
    assert {r.rule for r in gate(missing, p, "f") if not r.passed} == {"aesthetic_mean", "clip_score_mean"}
    stale = {"aesthetic": {"mean": 7.0}, "clip_score": {"mean": 0.3}, "model_fingerprint": "other"}
    assert [r.rule for r in gate(stale, p, "f") if not r.passed] == ["evaluated_this_model"]


def test_promote_publishes_and_moves_production(s3_server, tmp_path, monkeypatch):
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    storage = StorageParams(bucket="promo-ok", embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)})
    model = make_model(tmp_path / "model")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(summary_for(model)))
    decision = run_promote(params(tmp_path), storage, model, summary)
    assert decision["promote"] and decision["registry"]["alias"] == "production"
    written = json.loads((tmp_path / "promote" / "decision.json").read_text())
    assert written["registry"]["version"] == decision["registry"]["version"]
    assert "PROMOTE" in (tmp_path / "promote" / "decision.md").read_text()


def test_promote_refuses_a_failing_summary_and_leaves_production(s3_server, tmp_path, monkeypatch):
    from components.storage import make_client

    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    storage = StorageParams(bucket="promo-gate", embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)})
    good = make_model(tmp_path / "good", b"good")
    good_summary = tmp_path / "good.json"
    good_summary.write_text(json.dumps(summary_for(good)))
    first = run_promote(params(tmp_path), storage, good, good_summary)["registry"]["version"]

    bad = make_model(tmp_path / "bad", b"bad")
    bad_summary = tmp_path / "bad.json"
    bad_summary.write_text(json.dumps(summary_for(bad, aesthetic=5.1)))  # below the 6.0 floor
    with pytest.raises(GateRejected, match=r"aesthetic_mean = 5\.1 against 6"):
        run_promote(params(tmp_path), storage, bad, bad_summary)

    registry = Registry(make_client(s3_server.settings()), s3_server.settings(), "promo-gate", "registry")
    assert registry.alias("posters", "production")["version"] == first
    assert len(registry.list_versions("posters")) == 1  # the rejected model was never uploaded
    decision = json.loads((tmp_path / "promote" / "decision.json").read_text())
    assert decision["promote"] is False and decision["registry"] is None
