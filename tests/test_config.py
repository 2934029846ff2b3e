"""params.yaml loading: the profile switch, and one clear message per bad key."""

from pathlib import Path

import pytest
import yaml

from components.config import load_params
from components.plumbing.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_load_with_tiny_profile():
    params = load_params(REPO / "params.yaml")
    assert params.profile == "tiny"
    assert params.models.sdxl == ".easel/models/tiny/sdxl"
    assert params.train.resolution == 64  # from the profile, over the section's 1024
    assert params.validate_.min_short_side == 512 and params.validate_.max_long_side == 1024
    assert params.validate_.min_dpi == 96
    assert params.validate_.min_kb_per_pixel == 0.0005


def test_switching_to_real_sdxl_is_one_line(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("profile: tiny", "profile: sdxl", 1)
    params = load_params(write(tmp_path, text))
    assert params.models.sdxl == "stabilityai/stable-diffusion-xl-base-1.0"
    assert params.models.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert params.models.blip == "Salesforce/blip-image-captioning-large"
    assert (params.models.clip_model, params.models.clip_pretrained) == ("ViT-L-14-quickgelu", "openai")
    assert params.train.resolution == 1024 and params.train.mixed_precision == "bf16"


def test_missing_key_is_named(tmp_path):
    data = repo_params()
    del data["promote"]["model_name"]
    with pytest.raises(ConfigError, match=r"promote\.model_name: required key is missing"):
        load_params(write(tmp_path, data))


def test_wrong_type_is_named_with_the_value(tmp_path):
    data = repo_params()
    data["validate"]["min_dpi"] = "ninety-six"
    with pytest.raises(ConfigError, match=r"validate\.min_dpi: .*ninety-six"):
        load_params(write(tmp_path, data))


def test_unknown_key_is_a_typo(tmp_path):
    data = repo_params()
    data["train"]["learnig_rate"] = 1e-5
    with pytest.raises(ConfigError, match=r"train\.learnig_rate: unknown key"):
        load_params(write(tmp_path, data))


def test_bad_source_entry_names_its_index(tmp_path):
    data = repo_params()
    del data["download"]["sources"][1]["path"]
    with pytest.raises(ConfigError, match=r"download\.sources\[1\]\.path: required key is missing"):
        load_params(write(tmp_path, data))


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "profile: tiny\n  bad: [unclosed\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_params("/nonexistent/params.yaml")


def test_unknown_profile(tmp_path):
    data = repo_params()
    data["profile"] = "huge"
    with pytest.raises(ConfigError, match=r"profile: 'huge' is not defined .*known: sdxl, tiny"):
        load_params(write(tmp_path, data))


def test_profile_must_set_every_tracked_section(tmp_path):
    data = repo_params()
    del data["profiles"]["tiny"]["evaluate"]
    with pytest.raises(ConfigError, match=r"profiles\.tiny must set evaluate"):
        load_params(write(tmp_path, data))


def test_inverted_range_is_refused(tmp_path):
    data = repo_params()
    data["validate"]["min_short_side"] = 2000
    with pytest.raises(ConfigError, match=r"min_short_side .* is above max_short_side"):
        load_params(write(tmp_path, data))


def test_bad_network_in_allow_list(tmp_path):
    data = repo_params()
    data["download"]["allow_networks"] = ["not-a-network"]
    with pytest.raises(ConfigError, match=r"download\.allow_networks: .*not an IP network"):
        load_params(write(tmp_path, data))


def test_missing_dpi_policy_forms(tmp_path):
    data = repo_params()
    data["validate"]["missing_dpi"] = {"assume": 72}
    assert load_params(write(tmp_path, data)).validate_.missing_dpi.assume == 72
    data["validate"]["missing_dpi"] = "guess"
    with pytest.raises(ConfigError, match=r"validate\.missing_dpi"):
        load_params(write(tmp_path, data))


def test_curation_needs_a_criterion(tmp_path):
    data = repo_params()
    data["validate"]["curate"]["enabled"] = True
    with pytest.raises(ConfigError, match="sets neither keep_top_share nor min_aesthetic"):
        load_params(write(tmp_path, data))


def test_gate_settings_refuse_infinities_nan_and_zero_margins(tmp_path):
    for key, value, message in (
        ("margins", {"aesthetic": float("inf")}, "margins.aesthetic: Input should be a finite number"),
        ("min_aesthetic_mean", float("nan"), "min_aesthetic_mean: Input should be a finite number"),
        ("margins", {"clip_score": 0}, "margins.clip_score: Input should be greater than 0"),
        ("min_power", 1.0, "min_power: Input should be less than 1"),
    ):
        params = repo_params()
        params["profiles"]["tiny"]["gate"][key] = value  # the active profile's gate
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_params(write(tmp_path, params))


def one_line_error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as caught:
        load_params(write(tmp_path, data))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_every_profile_and_the_base_sections_are_checked_and_named_where_written(tmp_path):
    data = repo_params()
    data["profiles"]["sdxl"]["train"]["learnig_rate"] = 1e-5  # a typo in the profile that is not active
    assert "profiles.sdxl.train.learnig_rate: unknown key (typo?)" in one_line_error(tmp_path, data)

    data = repo_params()
    data["train"]["resolution"] = "big"  # the active profile (tiny) overrides it, so it was never read
    message = one_line_error(tmp_path, data)
    assert "params.yaml: train.resolution: " in message and "'big'" in message and "profiles." not in message

    data = repo_params()
    data["profiles"]["tiny"]["train"]["max_train_steps"] = 0  # a bad value inside the active profile
    assert "profiles.tiny.train.max_train_steps: Input should be greater than or equal to 1" in one_line_error(
        tmp_path, data
    )


def test_a_missing_section_is_named_as_missing(tmp_path):
    for section in ("gate", "evaluate"):
        data = repo_params()
        del data[section]
        assert one_line_error(tmp_path, data) == f"{write(tmp_path, data)}: {section}: required section(s) missing"


def test_a_union_setting_gets_one_line(tmp_path):
    data = repo_params()
    data["validate"]["missing_dpi"] = "maybe"
    message = one_line_error(tmp_path, data)
    assert message.count("missing_dpi") == 1 and "expected reject, accept or {assume: <dpi>}" in message
    data = repo_params()
    data["train"]["lr_scheduler_args"] = {"num_cycles": "many"}  # int | float | None
    assert one_line_error(tmp_path, data).count("num_cycles") == 1


def test_the_s3_endpoint_is_checked_when_params_load(tmp_path, monkeypatch):
    path = write(tmp_path, repo_params())
    for bad in ("not-a-url", "ftp://host", "http://", "http://host:99999", "http://host:abc"):
        monkeypatch.setenv("EASEL_S3_ENDPOINT", bad)
        with pytest.raises(ConfigError, match=r"EASEL_S3_ENDPOINT="):
            load_params(path)
    monkeypatch.setenv("EASEL_S3_ENDPOINT", "https://s3.example.com:9000")
    assert load_params(path).profile == "tiny"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("download", "archive_timeout_s", 0, r"download\.archive_timeout_s: Input should be greater than 0"),
        ("download", "max_archive_bytes", "lots", r"download\.max_archive_bytes: .*'lots'"),
        ("caption", "word_replacements", ["tshirt"], r"caption\.word_replacements: Input should be a valid dictionary"),
        ("reporting", "metrics_dir", ["data"], r"reporting\.metrics_dir: Input should be a valid string"),
        ("reporting", "log_dir", ".easel/logs", r"reporting\.log_dir: unknown key"),
        ("models", "clip_pretrained", "/models/open_clip.bin", r"models\.clip_pretrained: .*a pickle checkpoint"),
        ("models", "long_prompt_mode", "comfy", r"models\.long_prompt_mode: .*'kohya', 'comfyui' or 'a1111'"),
        ("train", "ema", {"enabled": True, "warmup": "sometimes"}, r"train\.ema\.warmup: .*'sometimes'"),
        ("storage", "shard_prefix", "../elsewhere", r"storage\.shard_prefix: String should match pattern"),
    ],
)
def test_new_settings_refuse_bad_values_by_name(tmp_path, section, key, value, message):
    """The settings added for safe archives, captions, reports, pickle refusal, long prompts and the EMA
    name a bad value."""
    data = repo_params()
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, data))
