"""Hub-cache fidelity: the `sdxl` profile's real ids, files, variant and revision resolve offline from a
Hugging Face cache laid out as the hub's, and the LAION weights are checked against their pinned sha256."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from components.config import ModelsParams
from components.models import hub_cache as hc
from components.models import loaders
from components.plumbing.errors import EaselError
from tests.helpers import self_signed_cert

REPO = Path(__file__).resolve().parents[1]
# The published LAION aesthetic predictor v2 weights (improved-aesthetic-predictor, 3,714,759 bytes).
LAION_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"

# Each repository's files that the cache must hold, by their published names (see hub_cache's docstring).
PUBLISHED = {
    hc.SDXL_BASE: {
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(
            f"{d}/{f}"
            for d in ("tokenizer", "tokenizer_2")
            for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
        ),
        *(
            f"{d}/{f}"
            for d in ("text_encoder", "text_encoder_2")
            for f in ("config.json", "model.safetensors", "model.fp16.safetensors")
        ),
        *(
            f"{d}/{f}"
            for d in ("unet", "vae", "vae_1_0")
            for f in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
        ),
        "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0_0.9vae.safetensors",
    },
    hc.SDXL_VAE_FP16_FIX: {"config.json", "diffusion_pytorch_model.safetensors", "sdxl_vae.safetensors"},
    hc.BLIP_LARGE: {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    },
    hc.WD_TAGGER_V3: {"config.json", "model.safetensors", "selected_tags.csv"},
    hc.OPENAI_CLIP_L14: {"open_clip_model.safetensors"},
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hub-cache") / "cache"
    return out, hc.build_hub_cache(out)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_files(hub, tls_cert):
    """An HTTPS server on 127.0.0.1 serving the cache's laion/ folder; yields its base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    out, _ = hub
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out / "laion")))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_cert)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_cache_holds_each_repository_as_the_hub_lays_it_out(hub):
    out, manifest = hub
    assert set(manifest["repos"]) == set(PUBLISHED)
    for repo_id, files in PUBLISHED.items():
        root = out / "hub" / ("models--" + repo_id.replace("/", "--"))
        commit = (root / "refs" / "main").read_text()
        assert commit == manifest["repos"][repo_id]["commit"] and len(commit) == 40
        snapshot = root / "snapshots" / commit
        found = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir()}
        assert found == files, repo_id
        for name in found:
            link = snapshot / name
            # A relative link into blobs/, named by the content's sha256.
            assert link.is_symlink() and not os.readlink(link).startswith("/")
            assert link.resolve().parent == (root / "blobs").resolve()
            assert link.resolve().name == hashlib.sha256(link.read_bytes()).hexdigest()


def test_sdxl_tokenizer_files_have_the_published_sizes(hub):
    """SDXL base 1.0's tokenizer files as published: 737/725 and 472/460 bytes, vocab.json 1.06 MB."""
    out, _ = hub
    snapshot = hc.snapshot_path(out / "hub", hc.SDXL_BASE)
    sizes = {p: (snapshot / p).stat().st_size for p in PUBLISHED[hc.SDXL_BASE] if p.startswith("tokenizer")}
    assert sizes["tokenizer/tokenizer_config.json"] == 737 and sizes["tokenizer_2/tokenizer_config.json"] == 725
    assert sizes["tokenizer/special_tokens_map.json"] == 472 and sizes["tokenizer_2/special_tokens_map.json"] == 460
    assert round(sizes["tokenizer/vocab.json"] / 1e6, 2) == 1.06 and round(sizes["tokenizer/merges.txt"] / 1e3) == 525
    assert (snapshot / "model_index.json").stat().st_size == 609


def test_sdxl_profile_loads_offline_from_the_cache(hub, https_files, tls_cert, tmp_path):
    """The profile's own loading code, in a fresh process with HF_HUB_OFFLINE=1 and only this cache."""
    out, _ = hub
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(out / "hub"),
        "HF_HUB_OFFLINE": "1",
        "EASEL_CACHE": str(tmp_path / "easel-cache"),
        "SSL_CERT_FILE": str(tls_cert[0]),
        "PYTHONPATH": str(REPO),
    }
    env.pop("HF_HOME", None)
    url = f"{https_files}/{hc.LAION_FILE}"
    worker = [sys.executable, str(REPO / "tests" / "hub_cache_worker.py"), str(out), url]
    done = subprocess.run(worker, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    parts = seen["parts"]
    assert parts["unet_dtype"] == parts["vae_dtype"] == "torch.float32"  # an fp16 variant still trains in fp32
    assert parts["fp16_variant_read"] == [True, True, True]  # unet, text_encoder, text_encoder_2: *.fp16.*
    assert not parts["without_variant_fp16_rounded"]  # variant: null reads the float32 files
    assert parts["vae_is_override"] and seen["base_pipeline"]["vae_is_override"]  # madebyollin's, not vae/
    assert parts["tokenizer_ids"] == [49406, 320, 3574, 49407] and parts["tokenizer_2_pad"] == "!"
    assert parts["noise_scheduler"] == "DDPMScheduler"
    assert seen["pinned_revision_loads"] == "text_time"  # revision = the cached commit resolves
    assert "cannot load models.sdxl" in seen["unknown_revision"]
    assert seen["base_pipeline"]["image"] == [64, 64, 3]
    assert isinstance(seen["blip_caption"], str) and seen["blip_caption"]
    assert seen["tagger"]["ratings"] == ["explicit", "general", "questionable", "sensitive"]
    assert all(isinstance(v, float) for v in seen["scores"].values())  # the weights came over HTTPS, pinned
    single = seen["single_file"]
    assert single["max_abs_diff"] <= 1e-5  # sd_xl_base_1.0.safetensors == the folder with vae_1_0/
    assert single["vae_override"] and single["parts_config_source"] == hc.SDXL_BASE
    assert seen["vae_single_file"]  # sdxl_vae.safetensors == the fp16-fix VAE folder
    assert (tmp_path / "easel-cache" / "weights").is_dir()


def test_a_commit_pinned_run_trains_and_saves_offline_without_refs_main(hub, tmp_path):
    """`models.revision` = a commit and a cache that holds only that commit (no refs/main, as a pinned
    download leaves it): training runs, and the final save finds the scheduler at that commit."""
    import shutil

    out, _ = hub
    cache = tmp_path / "cache"
    shutil.copytree(out, cache, symlinks=True)
    repo = cache / "hub" / ("models--" + hc.SDXL_BASE.replace("/", "--"))
    (repo / "refs" / "main").unlink()
    env = {**os.environ, "HF_HUB_CACHE": str(cache / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HOME", None)
    worker = [sys.executable, str(REPO / "tests" / "hub_cache_worker.py"), str(cache), "--train-pinned", str(tmp_path)]
    done = subprocess.run(worker, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"steps": 1, "scheduler": "EulerDiscreteScheduler"}


def test_laion_weights_are_checked_against_their_sha256(hub, https_files, tls_cert, tmp_path, monkeypatch):
    out, manifest = hub
    monkeypatch.setattr(loaders, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_cert[0]))
    url, good = f"{https_files}/{hc.LAION_FILE}", manifest["laion"]["sha256"]
    original = (out / manifest["laion"]["file"]).read_bytes()
    with pytest.raises(EaselError, match=r"expected 0{64}; not kept"):
        loaders.fetch_to_cache(url, "0" * 64)
    assert not any((tmp_path / "cache" / "weights").iterdir())  # nothing kept, no partial file
    path = loaders.fetch_to_cache(url, good)
    assert path.read_bytes() == original
    path.write_bytes(b"damaged")
    assert loaders.fetch_to_cache(url, good).read_bytes() == original  # a damaged copy is fetched again
    local = ModelsParams(aesthetic=str(path), aesthetic_sha256="1" * 64)
    with pytest.raises(EaselError, match=r"does not match models\.aesthetic_sha256"):
        loaders.aesthetic_weights_path(local)


def test_sdxl_profile_pins_the_published_laion_weights():
    profile = yaml.safe_load((REPO / "params.yaml").read_text())["profiles"]["sdxl"]["models"]
    assert profile["aesthetic"].endswith("/sac+logos+ava1-l14-linearMSE.pth")
    assert profile["aesthetic_sha256"] == LAION_SHA256
