"""The promotion gate and the S3 model registry, against a real SeaweedFS on loopback."""

import json
import math
import threading

import pandas as pd
import pytest

from components.config import GateParams, PromoteParams, StorageParams
from components.errors import EaselError, GateRejected
from components.evaluate.models import folder_fingerprint
from components.gate import GateInputs, evaluate_gate
from components.promote import run_gate, run_promote
from components.registry import ConcurrentAliasUpdate, Registry
from components.storage import EmbeddedS3, StorageUnavailable, make_client
from tests.conftest import free_port_block

GATE = GateParams(
    min_aesthetic_mean=6.0,
    min_clip_score_mean=0.25,
    aesthetic_floor=5.0,
    max_share_below_floor=0.2,
    margins={"aesthetic": 0.05, "clip_score": 0.01},
)


@pytest.fixture()
def registry(s3_server, s3_client):
    return Registry(s3_client, s3_server.settings(), s3_client.bucket_name, "registry")


def make_model(folder, content: bytes = b"weights"):
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(content)
    return folder


def comparison(ci_low_aesthetic=0.01, ci_low_clip=0.0):
    return {
        "aesthetic": {"mean_diff": 0.1, "ci_low": ci_low_aesthetic, "ci_high": 0.2, "win_rate": 0.7, "prompts": 6},
        "clip_score": {"mean_diff": 0.01, "ci_low": ci_low_clip, "ci_high": 0.02, "win_rate": 0.6, "prompts": 6},
        "confidence": 0.95,
    }


def write_evaluation(
    folder,
    model_dir,
    prompts,
    aesthetic=6.2,
    clip=0.28,
    scores=None,
    production_version=None,
    vs="base",
    **comparison_kw,
):
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "aesthetic": {"mean": aesthetic, "std": 0.2, "50%": aesthetic},
        "clip_score": {"mean": clip, "std": 0.02},
        "models": {
            vs: {
                "aesthetic": {"mean": aesthetic - 0.1, "std": 0.2, "50%": aesthetic},
                "clip_score": {"mean": clip, "std": 0.02},
            }
        },
        "comparisons": {f"vs_{vs}": comparison(**comparison_kw)},
        "model_fingerprint": folder_fingerprint(model_dir),
        "prompt_set_sha256": __import__("components.fsutil", fromlist=["x"]).sha256_file(prompts),
        "production_version": production_version,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    values = scores if scores is not None else [aesthetic] * 6
    pd.DataFrame({"model": "candidate", "aesthetic_score": values, "clip_score": clip}).to_csv(
        folder / "scores.csv", index=False
    )
    return folder


@pytest.fixture()
def project(tmp_path, s3_server, monkeypatch):
    """Paths and settings for a promote run against the test S3 server."""
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt\np1,a poster\n")
    storage = StorageParams(
        bucket="promo-" + __import__("os").urandom(3).hex(),
        embedded={"port": s3_server.port, "data_dir": str(s3_server.data_dir)},
    )
    promote = PromoteParams(out_dir=str(tmp_path / "promote"), model_name="posters")
    return {"tmp": tmp_path, "prompts": prompts, "storage": storage, "promote": promote}


def promote_model(project, name: str, content: bytes, **evaluation):
    model = make_model(project["tmp"] / name, content)
    eval_dir = write_evaluation(project["tmp"] / f"eval-{name}", model, project["prompts"], **evaluation)
    return run_promote(GATE, project["promote"], project["storage"], model, eval_dir, project["prompts"])


def registry_of(project, s3_server) -> Registry:
    return Registry(make_client(s3_server.settings()), s3_server.settings(), project["storage"].bucket, "registry")


# -- the gate ------------------------------------------------------------------------------------


def gate_inputs(**summary_overrides) -> GateInputs:
    summary = {
        "aesthetic": {"mean": 6.2},
        "clip_score": {"mean": 0.28},
        "model_fingerprint": "f",
        "prompt_set_sha256": "p",
        "production_version": "v1",
        "comparisons": {"vs_production": comparison()},
    }
    summary.update(summary_overrides)
    return GateInputs(summary, "s", pd.Series([6.0, 6.5, 7.0, 4.0, 6.2]), "f", "p", "v1")


def failing(inputs: GateInputs, params: GateParams = GATE) -> list[str]:
    rules, _ = evaluate_gate(inputs, params)
    return [r.rule for r in rules if not r.passed]


def test_gate_passes_a_good_candidate():
    rules, reference = evaluate_gate(gate_inputs(), GATE)
    assert reference == "production" and all(r.passed for r in rules)


def test_gate_floors_and_share_below_floor():
    assert failing(gate_inputs(aesthetic={"mean": 5.9})) == ["aesthetic_mean"]
    assert failing(gate_inputs(clip_score={"mean": 0.2})) == ["clip_score_mean"]
    strict = GATE.model_copy(update={"max_share_below_floor": 0.1})
    assert failing(gate_inputs(), strict) == ["share_below_aesthetic_5"]  # 1 of 5 images is under 5.0


def test_gate_non_inferiority_and_superiority():
    assert failing(gate_inputs(comparisons={"vs_production": comparison(ci_low_aesthetic=-0.06)})) == [
        "non_inferiority_aesthetic_vs_production"
    ]
    assert failing(gate_inputs(comparisons={"vs_production": comparison(ci_low_clip=-0.02)})) == [
        "non_inferiority_clip_score_vs_production"
    ]
    superior = GATE.model_copy(update={"superiority": "aesthetic"})
    assert failing(gate_inputs(comparisons={"vs_production": comparison(ci_low_aesthetic=0.0)}), superior) == [
        "superiority_aesthetic_vs_production"
    ]
    no_production = gate_inputs(production_version=None, comparisons={"vs_base": comparison()})
    no_production.production_version = None
    rules, reference = evaluate_gate(no_production, GATE)
    assert reference == "base" and all(r.passed for r in rules)  # nothing in production: base stands in


def test_gate_fails_closed():
    assert "aesthetic_mean" in failing(gate_inputs(aesthetic={"mean": math.nan}))
    assert "aesthetic_mean" in failing(gate_inputs(aesthetic={"mean": "high"}))
    assert "clip_score_mean" in failing(gate_inputs(clip_score={}))
    assert failing(gate_inputs(model_fingerprint="another")) == ["evaluated_this_model"]
    assert failing(gate_inputs(prompt_set_sha256="old")) == ["evaluated_this_prompt_set"]
    assert failing(gate_inputs(production_version="v0")) == ["evaluated_against_current_production"]
    assert failing(gate_inputs(comparisons={})) == ["non_inferiority"]
    nan_ci = comparison()
    nan_ci["aesthetic"]["ci_low"] = math.nan
    assert failing(gate_inputs(comparisons={"vs_production": nan_ci})) == ["non_inferiority_aesthetic_vs_production"]
    broken = GateInputs({}, "unreadable", None, "f", "p", None)
    assert len(failing(broken)) >= 5


# -- promote and the registry ---------------------------------------------------------------------


def test_promote_publishes_and_moves_production(project, s3_server):
    decision = promote_model(project, "good", b"good")
    assert decision["promote"] and decision["registry"]["alias"] == "production"
    written = json.loads((project["tmp"] / "promote" / "decision.json").read_text())
    assert written["registry"]["version"] == decision["registry"]["version"]
    assert "PROMOTE" in (project["tmp"] / "promote" / "decision.md").read_text()
    registry = registry_of(project, s3_server)
    manifest = registry.manifest("posters", decision["registry"]["version"])
    assert {e["path"] for e in manifest["extras"]} == {"evaluation_summary.json", "decision.json"}


def test_promote_refuses_a_failing_summary_and_leaves_production(project, s3_server):
    first = promote_model(project, "good", b"good")["registry"]["version"]
    with pytest.raises(GateRejected, match=r"aesthetic_mean = 5\.1, required >= 6"):
        promote_model(project, "bad", b"bad", aesthetic=5.1, production_version=first, vs="production")
    registry = registry_of(project, s3_server)
    assert registry.alias("posters", "production")["version"] == first
    assert len(registry.list_versions("posters")) == 1  # the rejected model was never uploaded
    decision = json.loads((project["tmp"] / "promote" / "decision.json").read_text())
    assert decision["promote"] is False and decision["registry"] is None


def test_a_stale_evaluation_against_old_production_is_refused(project, s3_server):
    promote_model(project, "one", b"one")
    with pytest.raises(GateRejected, match="evaluated_against_current_production"):
        promote_model(project, "two", b"two", production_version=None)  # evaluated before `one` went live


def test_gate_alone_changes_nothing(project, s3_server):
    model = make_model(project["tmp"] / "m", b"m")
    eval_dir = write_evaluation(project["tmp"] / "eval", model, project["prompts"])
    decision = run_gate(
        GATE,
        project["promote"],
        project["storage"],
        model,
        eval_dir,
        project["prompts"],
        out_dir=project["tmp"] / "gate",
    )
    assert decision["promote"] is True and (project["tmp"] / "gate" / "decision.md").is_file()
    assert registry_of(project, s3_server).list_versions("posters") == []


def test_publish_is_idempotent_and_a_version_without_manifest_does_not_exist(registry, tmp_path):
    model = make_model(tmp_path / "m")
    first = registry.publish("posters", model, {}, {})
    assert registry.publish("posters", model, {}, {})["version"] == first["version"]  # content-addressed
    key = f"{registry.version_prefix('posters', first['version'])}/manifest.json"
    registry.client.delete_object(Bucket=registry.bucket, Key=key)  # as if killed before the manifest
    assert registry.list_versions("posters") == []
    with pytest.raises(EaselError, match="no complete version"):
        registry.set_alias("posters", "production", first["version"], "test")


def test_alias_history_and_rollback(registry, tmp_path):
    v1 = registry.publish("posters", make_model(tmp_path / "a", b"one"), {}, {})["version"]
    v2 = registry.publish("posters", make_model(tmp_path / "b", b"two"), {}, {})["version"]
    registry.set_alias("posters", "production", v1, "first")
    record = registry.set_alias("posters", "production", v2, "second")
    assert record["version"] == v2 and record["history"][0]["version"] == v1
    rolled = registry.rollback("posters", "production")
    assert rolled["version"] == v1 and rolled["history"][0]["version"] == v2


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


def test_two_promotes_at_once_one_wins_and_the_alias_is_never_torn(registry, tmp_path):
    v0 = registry.publish("posters", make_model(tmp_path / "z", b"zero"), {}, {})["version"]
    registry.set_alias("posters", "production", v0, "start")
    candidates = [
        registry.publish("posters", make_model(tmp_path / f"c{i}", f"c{i}".encode()), {}, {})["version"]
        for i in range(2)
    ]
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def promote(version: str) -> None:
        mine = Registry(make_client(registry.settings), registry.settings, registry.bucket, registry.prefix)
        barrier.wait()
        try:
            outcomes[version] = mine.set_alias("posters", "production", version, "race", v0, check_expected=True)
        except ConcurrentAliasUpdate as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=promote, args=(v,)) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, o in outcomes.items() if isinstance(o, dict)]
    assert len(winners) == 1  # exactly one promote wins; the other is told, and changed nothing
    final = registry.alias("posters", "production")
    assert final["version"] == winners[0] and final["history"][0]["version"] == v0


def test_s3_killed_mid_upload_then_the_retry_completes_the_version(tmp_path, monkeypatch):
    """A server of its own, killed while a large file uploads: production stays, the retry finishes."""
    import os
    import signal

    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    server = EmbeddedS3(data_dir=tmp_path / "s3", port=free_port_block())
    server.start()
    try:
        storage = StorageParams(bucket="crash", embedded={"port": server.port, "data_dir": str(server.data_dir)})
        project = {
            "tmp": tmp_path,
            "prompts": tmp_path / "prompts.csv",
            "storage": storage,
            "promote": PromoteParams(out_dir=str(tmp_path / "promote"), model_name="posters"),
        }
        project["prompts"].write_text("id,prompt\np1,a poster\n")
        first = promote_model(project, "first", b"first")["registry"]["version"]

        big = make_model(tmp_path / "big", os.urandom(96 * 1024 * 1024))  # multipart: several 64 MiB parts
        eval_dir = write_evaluation(
            tmp_path / "eval-big", big, project["prompts"], production_version=first, vs="production"
        )
        import components.registry as registry_module

        original = registry_module.Registry._upload_verified

        def kill_during_big_upload(self, path, key, sha256, size):
            if size > 1024 * 1024:
                os.killpg(server.pid(), signal.SIGKILL)  # the server dies as the big file goes up
            return original(self, path, key, sha256, size)

        monkeypatch.setattr(registry_module.Registry, "_upload_verified", kill_during_big_upload)
        with pytest.raises(StorageUnavailable, match="unreachable"):
            run_promote(GATE, project["promote"], storage, big, eval_dir, project["prompts"])
        monkeypatch.setattr(registry_module.Registry, "_upload_verified", original)

        server.start()  # the same data folder: what was stored is still there
        registry = Registry(make_client(server.settings()), server.settings(), "crash", "registry")
        assert registry.alias("posters", "production")["version"] == first  # production unchanged
        assert [m["version"] for m in registry.list_versions("posters")] == [first]  # no half version
        decision = run_promote(GATE, project["promote"], storage, big, eval_dir, project["prompts"])
        assert registry.alias("posters", "production")["version"] == decision["registry"]["version"]
        registry.download("posters", "production", tmp_path / "check")  # every file verified
    finally:
        server.stop()
