"""Long prompts: kohya's chunked CLIP encoding (models.max_token_length 150 / 225), the same in training
and generation, and exactly CLIP's own encoding for prompts of up to 75 tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.generation import GenerationSettings, generate
from components.models.loaders import load_sdxl_pipeline
from components.prompt_encoding import chunks_needed, encode_prompts
from components.train import run_train
from tests.helpers import encode, make_caption_dir, noise
from tests.test_models import tiny_params
from tests.test_train import train_params, unet_weights

SHORT = "a minimalist coffee shop poster, warm light"
HEAD = ", ".join(f"tag{i}" for i in range(25))  # 89 tokens: past CLIP's 75, within 150


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_sdxl_pipeline(str(tiny_models / "sdxl"))


def encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]


@torch.no_grad()
def test_up_to_75_tokens_is_clip_s_own_encoding_whatever_the_setting(pipe):
    reference, _, pooled, _ = pipe.encode_prompt(prompt=[SHORT], device="cpu", do_classifier_free_guidance=False)
    for limit in (75, 150, 225):
        embeds, pooled_embeds = encode_prompts(*encoders(pipe), [SHORT], limit)
        assert embeds.shape == reference.shape  # one chunk: 77 states
        assert torch.equal(embeds, reference) and torch.equal(pooled_embeds, pooled)


@torch.no_grad()
def test_tokens_past_75_reach_the_embedding_only_when_asked(pipe):
    a, b = f"{HEAD}, a red sky", f"{HEAD}, a green sea"  # the same first 75 tokens
    assert chunks_needed(encoders(pipe)[1], [a], 150) == [2] and chunks_needed(encoders(pipe)[1], [a], 75) == [1]
    cut_a, _ = encode_prompts(*encoders(pipe), [a], 75)
    cut_b, _ = encode_prompts(*encoders(pipe), [b], 75)
    assert torch.equal(cut_a, cut_b)  # 75: the tails are cut, as CLIP does
    long_a, pooled_a = encode_prompts(*encoders(pipe), [a], 150)
    long_b, pooled_b = encode_prompts(*encoders(pipe), [b], 150)
    assert long_a.shape[1] == 2 + 75 * 2 and not torch.equal(long_a, long_b)
    assert torch.equal(pooled_a, pooled_b)  # the pooled embedding is the first chunk's (kohya)
    # The first chunk's inner states are the 75-token encoding's.
    assert torch.equal(long_a[:, :76], cut_a[:, :76])
    # A short prompt padded to two chunks: its own chunk, then the encoding of an empty one.
    padded, _ = encode_prompts(*encoders(pipe), [SHORT], 150, n_chunks=2)
    alone, _ = encode_prompts(*encoders(pipe), [SHORT], 150)
    assert torch.equal(padded[:, :76], alone[:, :76]) and padded.shape[1] == 152


def test_generation_reads_the_long_prompt_and_never_depends_on_the_batch(pipe):
    long = f"{HEAD}, a red sky"
    other = f"{HEAD}, a green sea"
    settings = GenerationSettings(num_inference_steps=3, height=64, width=64, max_token_length=150)

    def image(prompts, seeds, s=settings):
        return np.stack(generate(pipe, prompts, [""] * len(prompts), seeds, s, output_type="np"))

    assert not np.array_equal(image([long], [1]), image([other], [1]))  # the tail changes the picture
    short_75 = GenerationSettings(num_inference_steps=3, height=64, width=64, max_token_length=75)
    assert np.array_equal(image([long], [1], short_75), image([other], [1], short_75))  # cut at 75: the same
    together = image([SHORT, long], [0, 1])  # one and two chunks in one call
    assert np.allclose(together[0], image([SHORT], [0])[0], atol=1e-6)
    assert np.allclose(together[1], image([long], [1])[0], atol=1e-6)
    assert GenerationSettings(max_token_length=150).key() != GenerationSettings().key()  # part of the cache key


def test_training_reads_long_captions_cached_or_not(tmp_path, tiny_models):
    files = {f"img{i}.png": encode(noise(96, 96, seed=300 + i), "PNG", dpi=(96, 96)) for i in range(4)}
    captions = make_caption_dir(tmp_path, files, [f"{HEAD}, style {i}" if i % 2 else f"a poster {i}" for i in range(4)])
    models = tiny_params(tiny_models).model_copy(update={"max_token_length": 150})
    run_train(train_params(tmp_path / "plain"), models, captions, progress=False)
    cached = train_params(tmp_path / "cached", cache_text_embeddings=True, cache_dir=str(tmp_path / "cache"))
    run_train(cached, models, captions, progress=False)
    a = unet_weights(tmp_path / "plain" / "train" / "model")
    b = unet_weights(tmp_path / "cached" / "train" / "model")
    cut = tiny_params(tiny_models)  # 75: the captions' tails are not read, so training differs
    run_train(train_params(tmp_path / "cut"), cut, captions, progress=False)
    c = unet_weights(tmp_path / "cut" / "train" / "model")
    cached_vs_not = max((a[k] - b[k]).abs().max().item() for k in a)
    read_vs_cut = max((a[k] - c[k]).abs().max().item() for k in a)
    # Cached embeddings (encoded one caption at a time) differ from batched ones by float rounding
    # (< 1e-6 in the embeddings), which six steps at lr 1e-4 grow; reading the tails is a real change.
    assert cached_vs_not < 1e-4 and cached_vs_not * 10 < read_vs_cut, (cached_vs_not, read_vs_cut)
