"""Promote and the S3 model registry, against a real SeaweedFS on loopback (the gate's rules: test_gate.py)."""

import json
import os
import shutil
import threading

import pytest

from components.config import EvaluateParams, PromoteParams, StorageParams
from components.plumbing.errors import EaselError, GateRejected
from components.plumbing.fsutil import sha256_file
from components.release.promote import run_gate, run_promote
from components.release.registry import ConcurrentAliasUpdate, Registry
from components.storage import EmbeddedS3, StorageUnavailable, make_client
from tests.conftest import REPO, free_port_block
from tests.helpers import make_model, pickle_payload, sdxl_gate_params, write_evaluation, write_prompts

GATE = sdxl_gate_params()
BOOTSTRAP = (0.95, 2000, 0)


@pytest.fixture()
def registry(s3_server, s3_client):
    return Registry(s3_client, s3_server.settings(), s3_client.bucket_name, "registry")


@pytest.fixture()
def project(tmp_path, s3_server, monkeypatch):
    """Paths and settings for a promote run against the test S3 server."""
    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    return project_settings(tmp_path, s3_server.port, s3_server.data_dir, "promo-" + os.urandom(3).hex())


def project_settings(tmp_path, port: int, data_dir, bucket: str) -> dict:
    prompts = write_prompts(tmp_path / "prompts.csv", 12)
    storage = StorageParams(bucket=bucket, embedded={"port": port, "data_dir": str(data_dir)})
    promote = PromoteParams(out_dir=str(tmp_path / "promote"), model_name="posters")
    return {"tmp": tmp_path, "prompts": prompts, "storage": storage, "promote": promote}


def evaluate_params(project, eval_dir) -> EvaluateParams:
    return EvaluateParams(out_dir=str(eval_dir), prompts=str(project["prompts"]), bootstrap={"resamples": 2000})


def evaluated_model(project, name: str, content: bytes, **evaluation):
    model = make_model(project["tmp"] / name, content)
    eval_dir = write_evaluation(
        project["tmp"] / f"eval-{name}", model, project["prompts"], bootstrap=BOOTSTRAP, **evaluation
    )
    return model, evaluate_params(project, eval_dir)


def promote_model(project, name: str, content: bytes, **evaluation):
    model, evaluate = evaluated_model(project, name, content, **evaluation)
    return run_promote(GATE, project["promote"], project["storage"], evaluate, model)


def registry_of(project, s3_server) -> Registry:
    return Registry(make_client(s3_server.settings()), s3_server.settings(), project["storage"].bucket, "registry")


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
    with pytest.raises(GateRejected, match=r"aesthetic_mean \(.*\)"):
        promote_model(project, "bad", b"bad", aesthetic=5.1, production_version=first)
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
    model, evaluate = evaluated_model(project, "m", b"m")
    decision = run_gate(GATE, project["promote"], project["storage"], evaluate, model, out_dir=project["tmp"] / "gate")
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


def test_a_version_holds_no_pickle_and_no_path_outside_its_folder(registry, tmp_path):
    """Publishing a folder with a pickle is refused; a manifest (written by whoever can write the
    bucket) that lists a pickle or a path out of the folder is refused before anything is fetched."""
    ran = tmp_path / "payload-ran"
    model = make_model(tmp_path / "m")
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle_payload(ran))
    with pytest.raises(EaselError, match=r"unet/diffusion_pytorch_model\.bin is a pickle file"):
        registry.publish("posters", model, {}, {})
    (model / "unet" / "diffusion_pytorch_model.bin").unlink()
    manifest = registry.publish("posters", model, {}, {})
    key = f"{registry.version_prefix('posters', manifest['version'])}/manifest.json"
    for planted, refused in (
        ("text_encoder/pytorch_model.bin", "is a pickle file"),
        ("../../escaped.safetensors", "leaves the version's folder"),
        ("/etc/cron.d/evil", "leaves the version's folder"),
    ):
        entry = {"path": planted, "bytes": 1, "sha256": "0" * 64}
        tampered = manifest | {"files": [*manifest["files"], entry]}
        registry.client.put_object(Bucket=registry.bucket, Key=key, Body=json.dumps(tampered).encode())
        with pytest.raises(EaselError, match=refused):
            registry.download("posters", manifest["version"], tmp_path / "out" / "model")
    assert not (tmp_path / "out").exists() and not ran.exists()


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
    import signal

    monkeypatch.delenv("EASEL_S3_ENDPOINT", raising=False)
    server = EmbeddedS3(data_dir=tmp_path / "s3", port=free_port_block())
    server.start()
    try:
        project = project_settings(tmp_path, server.port, server.data_dir, "crash")
        first = promote_model(project, "first", b"first")["registry"]["version"]

        # multipart: several 64 MiB parts
        big, evaluate = evaluated_model(project, "big", os.urandom(96 * 1024 * 1024), production_version=first)
        import components.release.registry as registry_module

        original = registry_module.Registry._upload_verified

        def kill_during_big_upload(self, path, key, sha256, size):
            if size > 1024 * 1024:
                os.killpg(server.pid(), signal.SIGKILL)  # the server dies as the big file goes up
            return original(self, path, key, sha256, size)

        monkeypatch.setattr(registry_module.Registry, "_upload_verified", kill_during_big_upload)
        with pytest.raises(StorageUnavailable, match="unreachable"):
            run_promote(GATE, project["promote"], project["storage"], evaluate, big)
        monkeypatch.setattr(registry_module.Registry, "_upload_verified", original)

        server.start()  # the same data folder: what was stored is still there
        registry = Registry(make_client(server.settings()), server.settings(), "crash", "registry")
        assert registry.alias("posters", "production")["version"] == first  # production unchanged
        assert [m["version"] for m in registry.list_versions("posters")] == [first]  # no half version
        decision = run_promote(GATE, project["promote"], project["storage"], evaluate, big)
        assert registry.alias("posters", "production")["version"] == decision["registry"]["version"]
        registry.download("posters", "production", tmp_path / "check")  # every file verified
    finally:
        server.stop()


def test_promote_can_publish_the_single_file_beside_the_folder(project, s3_server, tiny_models, tmp_path):
    from safetensors import safe_open

    model = shutil.copytree(tiny_models / "sdxl", tmp_path / "real-model")  # a real pipeline, to export
    eval_dir = write_evaluation(tmp_path / "eval-real", model, project["prompts"], bootstrap=BOOTSTRAP)
    promote = project["promote"].model_copy(update={"export_single_file": "fp16"})
    decision = run_promote(GATE, promote, project["storage"], evaluate_params(project, eval_dir), model)
    registry = registry_of(project, s3_server)
    manifest = registry.manifest("posters", decision["registry"]["version"])
    extras = {e["path"]: e for e in manifest["extras"]}
    assert {"posters.safetensors", "posters.md"} <= set(extras)
    key = f"{registry.version_prefix('posters', manifest['version'])}/posters.safetensors"
    registry.client.download_file(registry.bucket, key, str(tmp_path / "posters.safetensors"))
    assert sha256_file(tmp_path / "posters.safetensors") == extras["posters.safetensors"]["sha256"]
    with safe_open(str(tmp_path / "posters.safetensors"), "pt") as checkpoint:
        unet = [k for k in checkpoint.keys() if k.startswith("model.diffusion_model.")]  # noqa: SIM118
        assert unet and checkpoint.get_tensor(unet[0]).dtype == __import__("torch").float16


def test_a_failed_multipart_upload_is_aborted(registry, tmp_path):
    from botocore.exceptions import ClientError

    model = make_model(tmp_path / "big", os.urandom(96 * 1024 * 1024))  # two 64 MiB parts
    parts = []

    def fail_the_second_part(params, **kwargs):
        parts.append(params["PartNumber"])
        if params["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")

    registry.client.meta.events.register("provide-client-params.s3.UploadPart", fail_the_second_part)
    try:
        with pytest.raises(StorageUnavailable, match="InternalError"):
            registry.publish("posters", model, {}, {})
    finally:
        registry.client.meta.events.unregister("provide-client-params.s3.UploadPart", fail_the_second_part)
    assert 2 in parts
    pending = registry.client.list_multipart_uploads(Bucket=registry.bucket).get("Uploads", [])
    assert pending == []  # no half-uploaded parts left behind
    assert registry.list_versions("posters") == []


def test_registry_gc_finds_and_removes_only_what_nothing_references(registry, tmp_path, capsys):
    kept = registry.publish("posters", make_model(tmp_path / "good", b"good"), {}, {})["version"]
    registry.set_alias("posters", "production", kept, "test")
    base = registry.version_prefix("posters", kept)
    registry.client.put_object(Bucket=registry.bucket, Key=f"{base}/files/leftover.bin", Body=b"x")  # not listed
    orphan = registry.version_prefix("posters", "v-interrupted")  # a publish killed before its manifest
    registry.client.put_object(Bucket=registry.bucket, Key=f"{orphan}/files/model_index.json", Body=b"{}")
    upload = registry.client.create_multipart_upload(Bucket=registry.bucket, Key=f"{orphan}/files/unet/big.bin")
    registry.client.upload_part(
        Bucket=registry.bucket, Key=f"{orphan}/files/unet/big.bin", UploadId=upload["UploadId"], PartNumber=1, Body=b"p"
    )

    assert registry.garbage("posters").objects == []  # all younger than a day: a publish may be running
    found = registry.garbage("posters", older_than_s=0)
    assert sorted(found.objects) == [f"{base}/files/leftover.bin", f"{orphan}/files/model_index.json"]
    assert found.uploads == [(f"{orphan}/files/unet/big.bin", upload["UploadId"])]
    registry.collect("posters", found)
    assert registry.garbage("posters", older_than_s=0).objects == []
    assert registry.client.list_multipart_uploads(Bucket=registry.bucket).get("Uploads", []) == []
    registry.download("posters", "production", tmp_path / "check")  # the live version is whole


def test_registry_list_names_each_alias_once(project, s3_server, capsys, monkeypatch):
    import yaml

    from components.cli import main

    version = promote_model(project, "one", b"one")["registry"]["version"]
    registry = registry_of(project, s3_server)
    registry.set_alias("posters", "staging", version, "test")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["storage"] = project["storage"].model_dump()
    params["promote"]["model_name"] = "posters"
    (project["tmp"] / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project["tmp"])
    assert main(["registry", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(version) and lines[0].endswith("[production, staging]")
    assert lines[1:] == [f"production -> {version}  (whole)", f"staging -> {version}  (whole)"]

    assert main(["registry", "gc"]) == 0
    assert "would remove 0 orphan objects (0 bytes), 0 pending uploads (dry run" in capsys.readouterr().out


def test_the_model_fingerprint_is_the_model_not_its_folder(tmp_path, tiny_models):
    """Identical weights saved from two project folders (diffusers writes the source folder into each
    config as `_name_or_path`) are one model: one fingerprint, so one registry version and one
    leaderboard row. A changed weight or config value is another model; the model card is not the model."""
    import json
    import shutil

    from components.plumbing.fsutil import model_fingerprint

    a = shutil.copytree(tiny_models / "sdxl", tmp_path / "a" / "model")
    b = shutil.copytree(tiny_models / "sdxl", tmp_path / "elsewhere" / "b" / "model")
    for folder in (a, b):
        config = json.loads((folder / "unet/config.json").read_text())
        config["_name_or_path"] = str(folder.parent / ".easel/models/tiny/sdxl")
        (folder / "unet/config.json").write_text(json.dumps(config, indent=2))
        (folder / "README.md").write_text(f"trained in {folder}")
    assert model_fingerprint(a) == model_fingerprint(b)

    config = json.loads((b / "unet/config.json").read_text())
    config["sample_size"] += 1
    (b / "unet/config.json").write_text(json.dumps(config))
    assert model_fingerprint(a) != model_fingerprint(b)

    c = shutil.copytree(a, tmp_path / "c")
    weights = c / "unet/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(a) != model_fingerprint(c)


# -- production is always whole ------------------------------------------------------------------


def cli_in(project, monkeypatch):
    """`easel` in a folder whose params name the project's bucket and model (what a user would run)."""
    import yaml

    from components.cli import main

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["storage"] = project["storage"].model_dump()
    params["promote"]["model_name"] = "posters"
    (project["tmp"] / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project["tmp"])
    return main


def delete_files(registry, version: str, count: int) -> list[str]:
    base = registry.version_prefix("posters", version)
    keys = [f"{base}/files/{e['path']}" for e in registry.manifest("posters", version)["files"]][:count]
    for key in keys:
        registry.client.delete_object(Bucket=registry.bucket, Key=key)
    return keys


def test_gc_racing_a_resumed_publish_leaves_a_whole_version(project, s3_server, monkeypatch):
    """An interrupted publish left files (no manifest); `registry gc --apply` runs while the retry, finding
    them there, goes on. gc spares the version (its publish holds a lease), and files that vanish anyway
    (a gc that listed them before the lease was taken) are put back before the manifest is written."""
    import components.release.registry as registry_module
    from components.plumbing.fsutil import dir_manifest, manifest_digest

    registry = registry_of(project, s3_server)
    model = make_model(project["tmp"] / "m", b"m" * 1000)
    version = "v-" + manifest_digest(dir_manifest(model))[:16]
    files = f"{registry.version_prefix('posters', version)}/files/"
    original = registry_module.Registry._upload_verified

    def killed_after_the_first_file(self, path, key, sha256, size):
        if self.client.list_objects_v2(Bucket=self.bucket, Prefix=files).get("KeyCount", 0):
            raise StorageUnavailable("the publish was killed")
        return original(self, path, key, sha256, size)

    # A publish killed long ago: its lease has run out, so what it left is garbage.
    monkeypatch.setattr(registry_module, "LEASE_S", -1.0)
    monkeypatch.setattr(registry_module.Registry, "_upload_verified", killed_after_the_first_file)
    with pytest.raises(StorageUnavailable):
        registry.publish("posters", model, {}, {})
    assert len(registry.garbage("posters", older_than_s=0).objects) == 2  # the file it finished, and its lease
    monkeypatch.setattr(registry_module, "LEASE_S", 3600.0)

    seen = {}

    def gc_while_publishing(self, path, key, sha256, size):
        if not seen:
            seen["gc"] = self.garbage("posters", older_than_s=0)  # the retry holds the lease now
            self.collect("posters", seen["gc"])
            for obj in self.client.list_objects_v2(Bucket=self.bucket, Prefix=files).get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])  # a gc that raced the lease
        return original(self, path, key, sha256, size)

    monkeypatch.setattr(registry_module.Registry, "_upload_verified", gc_while_publishing)
    manifest = registry.publish("posters", model, {}, {})
    assert seen["gc"].objects == [] and seen["gc"].uploads == []
    assert manifest["version"] == version and registry.verify("posters", version) == []
    assert registry.garbage("posters", older_than_s=0).objects == []  # the lease went with the publish


def test_production_with_files_gone_is_flagged_and_never_moved_to(project, s3_server, monkeypatch, capsys):
    first = promote_model(project, "one", b"one")["registry"]["version"]
    second = promote_model(project, "two", b"two", production_version=first)["registry"]["version"]
    registry = registry_of(project, s3_server)
    main = cli_in(project, monkeypatch)

    # Files of the earlier version vanish: nothing may point at it again.
    (gone,) = delete_files(registry, first, 1)
    assert registry.check_whole("posters", first) == [f"{gone.split('/files/')[1]}: missing"]
    with pytest.raises(EaselError, match=rf"posters/{first} is not whole .*missing.*refusing to point production"):
        registry.rollback("posters", "production")
    with pytest.raises(EaselError, match="is not whole"):
        registry.set_alias("posters", "staging", first, "by hand")
    assert registry.alias("posters", "production")["version"] == second
    assert main(["registry", "verify", first]) == 2
    assert f"posters/{first} is not whole" in capsys.readouterr().err
    assert main(["registry", "verify"]) == 0  # production (the second) is whole
    assert "whole, 4 files read back and hashed" in capsys.readouterr().out

    # Now production itself loses a file: listed as not whole, and the gate will not compare with it.
    delete_files(registry, second, 1)
    assert main(["registry", "list"]) == 0
    assert f"production -> {second}  (NOT WHOLE: " in capsys.readouterr().out
    model, evaluate = evaluated_model(project, "three", b"three", production_version=second)
    with pytest.raises(GateRejected, match="production_is_whole"):
        run_promote(GATE, project["promote"], project["storage"], evaluate, model)
    assert registry.alias("posters", "production")["version"] == second


def test_a_dangling_production_alias_is_listed_and_rejects(project, s3_server, monkeypatch, capsys):
    """The version production names was deleted, the alias kept: `registry list` shows it (it printed
    nothing), and the gate does not promote against a production that is not there."""
    version = promote_model(project, "one", b"one")["registry"]["version"]
    registry = registry_of(project, s3_server)
    base = registry.version_prefix("posters", version)
    for obj in registry.client.list_objects_v2(Bucket=registry.bucket, Prefix=base).get("Contents", []):
        registry.client.delete_object(Bucket=registry.bucket, Key=obj["Key"])
    main = cli_in(project, monkeypatch)
    assert main(["registry", "list"]) == 0
    assert f"production -> {version}  (NOT WHOLE: {version}: no manifest" in capsys.readouterr().out
    model, evaluate = evaluated_model(project, "two", b"two", production_version=version)
    with pytest.raises(GateRejected, match="production_is_whole"):
        run_promote(GATE, project["promote"], project["storage"], evaluate, model)
    assert registry.alias("posters", "production")["version"] == version  # not moved
