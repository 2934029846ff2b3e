"""Long prompts: chunked CLIP encoding (models.max_token_length 150 / 225) in kohya's, ComfyUI's and
AUTOMATIC1111's layouts (models.long_prompt_mode), the same in training and generation, and exactly
CLIP's own encoding for prompts of up to 75 tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.models.loaders import load_sdxl_pipeline
from components.plumbing.errors import ConfigError
from components.sdxl.generation import GenerationSettings, generate
from components.sdxl.prompt_encoding import chunks_needed, encode_prompts, split_chunks
from components.train import run_train
from tests.helpers import encode, make_caption_dir, noise
from tests.test_config import load_params, repo_params, write
from tests.test_models import tiny_params
from tests.test_train import train_params, unet_weights

SHORT = "a minimalist coffee shop poster, warm light"
HEAD = ", ".join(f"tag{i}" for i in range(25))  # 89 tokens: past CLIP's 75, within 150
MODES = ("kohya", "comfyui", "a1111")
WORD = "supercalifragilisticexpialidocious"  # 9 tokens
REDS = " ".join(["red"] * 64)  # 64 tokens, then a comma: the comma is the 65th token (index 64)
EXACTLY_75 = f"{REDS}, " + " ".join(["blue"] * 10)  # 75 tokens, a comma among the last 20
COMMA_NEAR_75 = f"{REDS}, " + " ".join(["blue"] * 20)  # 85 tokens, the last comma 11 tokens before the boundary
STRADDLE = f"{REDS}, " + " ".join(["blue"] * 6) + f" {WORD} sky"  # 81 tokens: WORD is tokens 71-79
THREE_CHUNKS = f"{HEAD}, {HEAD}, a red sky"  # 183 tokens


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


def content(pipe, text: str) -> list[int]:
    return pipe.tokenizer(text, add_special_tokens=False, verbose=False).input_ids


@torch.no_grad()
def reference_77n(pipe, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's / AUTOMATIC1111's encoding of chunks cut by hand: each <BOS> + tokens + <EOS>, padded
    with the tokenizer's pad (clip_l: <EOS>, clip_g: id 0); every chunk's 77 penultimate states, in
    order; the pooled embedding is the first chunk's."""
    states = []
    for tokenizer, encoder in zip(*reversed(encoders(pipe)), strict=True):
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        ids = torch.tensor([[bos, *chunk, eos] + [pad] * (75 - len(chunk)) for chunk in chunks])
        out = encoder(ids, output_hidden_states=True)
        states.append(torch.cat(list(out.hidden_states[-2]))[None])
    pooled = pipe.text_encoder_2(ids, output_hidden_states=True).text_embeds[:1]
    return torch.cat(states, dim=-1), pooled


def a1111_reference(tokens: list[int], comma: int) -> list[list[int]]:
    """AUTOMATIC1111's tokenize_line, transcribed: each token goes into the current chunk; before a
    non-comma token lands on a full chunk whose last comma is at most 20 tokens back, the chunk is cut
    after the comma and the rest moves on; a full chunk then closes."""
    chunks, current, comma_at = [], [], None
    for token in tokens:
        if token == comma:
            comma_at = len(current)
        elif len(current) == 75 and comma_at is not None and 75 - comma_at <= 20:
            chunks.append(current[: comma_at + 1])
            current, comma_at = current[comma_at + 1 :], None
        if len(current) == 75:
            chunks.append(current)
            current, comma_at = [], None
        current.append(token)
    if current or not chunks:
        chunks.append(current)
    return chunks


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_up_to_75_tokens_is_clip_s_own_encoding_in_every_mode(pipe, mode):
    assert len(content(pipe, EXACTLY_75)) == 75
    for prompt in (SHORT, "", EXACTLY_75):  # A1111 cuts at a comma only when a 76th token comes
        reference, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], device="cpu", do_classifier_free_guidance=False)
        for limit in (75, 150, 225):
            embeds, pooled_embeds = encode_prompts(*encoders(pipe), [prompt], limit, mode=mode)
            assert torch.equal(embeds, reference) and torch.equal(pooled_embeds, pooled), (prompt, limit)


@torch.no_grad()
def test_comfyui_and_a1111_cut_and_join_long_prompts_as_the_tools_do(pipe):
    tokens = content(pipe, COMMA_NEAR_75)
    assert len(tokens) == 85 and tokens[64] == pipe.tokenizer.get_vocab()[",</w>"]
    straddle = content(pipe, STRADDLE)
    assert len(straddle) == 81 and straddle[71:80] == content(pipe, WORD)
    by_hand = {
        # ComfyUI: the prompt is one segment, cut every 75 tokens (the word is split: 4 tokens, then 5).
        "comfyui": {COMMA_NEAR_75: [tokens[:75], tokens[75:]], STRADDLE: [straddle[:75], straddle[75:]]},
        # A1111: at the 76th token the last comma is 11 tokens back (<= 20): the chunk ends after it.
        "a1111": {COMMA_NEAR_75: [tokens[:65], tokens[65:]], STRADDLE: [straddle[:65], straddle[65:]]},
    }
    for mode, prompts in by_hand.items():
        for prompt, chunks in prompts.items():
            assert split_chunks(pipe.tokenizer, [prompt], 150, mode) == [chunks]
            assert split_chunks(pipe.tokenizer_2, [prompt], 150, mode) == [chunks]
            embeds, pooled = encode_prompts(*encoders(pipe), [prompt], 150, mode=mode)
            reference, reference_pooled = reference_77n(pipe, chunks)
            assert embeds.shape[1] == 2 * 77
            assert torch.equal(embeds, reference) and torch.equal(pooled, reference_pooled), (mode, prompt)
    # The two tools' chunk boundaries differ, so do their encodings; kohya's chunks are ComfyUI's.
    comfy, a1111 = (encode_prompts(*encoders(pipe), [COMMA_NEAR_75], 150, mode=m)[0] for m in ("comfyui", "a1111"))
    assert not torch.equal(comfy, a1111)
    assert split_chunks(pipe.tokenizer, [STRADDLE], 150, "kohya") == [by_hand["comfyui"][STRADDLE]]
    # Longer prompts against the transcription: chunk counts are capped at max_token_length / 75.
    comma = pipe.tokenizer.get_vocab()[",</w>"]
    for prompt in (HEAD, THREE_CHUNKS, "a, " * 80, f"{HEAD} {WORD} {HEAD}"):
        expected = a1111_reference(content(pipe, prompt), comma)
        for limit in (75, 150, 225):
            assert split_chunks(pipe.tokenizer, [prompt], limit, "a1111") == [expected[: limit // 75]]
        embeds, _ = encode_prompts(*encoders(pipe), [prompt], 225, mode="a1111")
        assert torch.equal(embeds, reference_77n(pipe, expected[:3])[0])
    assert [len(c) for c in a1111_reference(content(pipe, "a, " * 80), comma)] == [75, 75, 10]  # a comma 76th: no cut


@torch.no_grad()
def test_repeating_to_the_least_common_multiple_leaves_cross_attention_unchanged(pipe):
    two, three = f"{HEAD}, a red sky", THREE_CHUNKS
    assert chunks_needed(encoders(pipe)[1], [two, three], 225, "comfyui") == [2, 3]
    alone_two, pooled_two = encode_prompts(*encoders(pipe), [two], 225, mode="comfyui")
    alone_three, _ = encode_prompts(*encoders(pipe), [three], 225, mode="comfyui")
    both, pooled = encode_prompts(*encoders(pipe), [two, three], 225, mode="comfyui")
    assert alone_two.shape[1] == 2 * 77 and alone_three.shape[1] == 3 * 77 and both.shape[1] == 6 * 77
    assert torch.allclose(both[0], alone_two[0].repeat(3, 1), atol=1e-6)  # tiled, as ComfyUI repeats
    assert torch.allclose(both[1], alone_three[0].repeat(2, 1), atol=1e-6)
    assert torch.allclose(pooled[:1], pooled_two, atol=1e-6)
    # One of the U-Net's cross-attention layers, by hand: softmax(q k^T / sqrt(d)) v, per head.
    attn = next(m for name, m in pipe.unet.named_modules() if name.endswith("attn2"))
    queries = attn.to_q(torch.randn(1, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0)))

    def heads(x):  # (batch, tokens, width) -> (batch, heads, tokens, width / heads)
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    def attend(embeds):
        out = torch.nn.functional.scaled_dot_product_attention(
            heads(queries), heads(attn.to_k(embeds)), heads(attn.to_v(embeds))
        )
        return out.transpose(1, 2).flatten(-2)

    assert torch.allclose(attend(alone_two), attend(both[:1]), atol=1e-6)
    assert torch.allclose(attend(alone_three), attend(both[1:]), atol=1e-6)
    # The whole U-Net: text enters it only through cross-attention.
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])

    def unet(embeds):
        extra = {"text_embeds": pooled_two, "time_ids": time_ids}
        return pipe.unet(latents, 500, encoder_hidden_states=embeds, added_cond_kwargs=extra, return_dict=False)[0]

    assert torch.allclose(unet(alone_two), unet(both[:1]), atol=1e-5)


def test_generation_with_unequal_prompt_and_negative_in_every_mode(pipe):
    negative = f"{HEAD}, blurry"  # 2 chunks against the prompt's 3: 6 chunks in the 77 n modes, 3 in kohya
    images = {}
    for mode in MODES:
        settings = GenerationSettings(
            num_inference_steps=2, height=64, width=64, max_token_length=225, long_prompt_mode=mode
        )
        together = np.stack(generate(pipe, [THREE_CHUNKS, SHORT], [negative, ""], [1, 2], settings, output_type="np"))
        alone = np.stack(generate(pipe, [THREE_CHUNKS], [negative], [1], settings, output_type="np"))
        assert np.isfinite(together).all()
        assert np.allclose(together[0], alone[0], atol=1e-6)  # never depends on the batch
        images[mode] = alone[0]
    assert not np.array_equal(images["kohya"], images["comfyui"])  # the layouts differ
    assert not np.array_equal(images["comfyui"], images["a1111"])  # so do the chunk boundaries
    keys = {mode: GenerationSettings(long_prompt_mode=mode).key() for mode in MODES}
    assert len(set(keys.values())) == 3
    assert "long_prompt_mode" not in keys["kohya"]  # images cached before the setting keep their keys


def test_training_in_comfyui_mode_caches_its_own_embeddings(tmp_path, tiny_models):
    files = {f"img{i}.png": encode(noise(96, 96, seed=400 + i), "PNG", dpi=(96, 96)) for i in range(4)}
    captions = make_caption_dir(tmp_path, files, [THREE_CHUNKS, f"{HEAD}, style 1", "a poster 2", f"{HEAD}, style 3"])
    models = tiny_params(tiny_models).model_copy(update={"max_token_length": 225, "long_prompt_mode": "comfyui"})
    cache = tmp_path / "cache"
    samples = dict(sample_every_n_steps=6, sample_prompts=[THREE_CHUNKS], sample_steps=2)  # negative: "basic"
    comfy = train_params(tmp_path / "comfy", cache_text_embeddings=True, cache_dir=str(cache), **samples)
    run_train(comfy, models, captions, progress=False)
    comfy_files = set((cache / "text").rglob("*.safetensors"))
    # 3, 2, 1 and 2 chunks: every caption repeated to their least common multiple, 6 chunks of 77.
    assert {load_file(str(f))["prompt_embeds"].shape[0] for f in comfy_files} == {6 * 77}
    assert list((tmp_path / "comfy" / "train" / "samples").rglob("*.png"))
    kohya = train_params(tmp_path / "kohya", cache_text_embeddings=True, cache_dir=str(cache))
    run_train(kohya, models.model_copy(update={"long_prompt_mode": "kohya"}), captions, progress=False)
    kohya_files = set((cache / "text").rglob("*.safetensors")) - comfy_files
    assert len(kohya_files) == len(comfy_files)  # a key of its own: nothing of the other mode's is read
    assert {load_file(str(f))["prompt_embeds"].shape[0] for f in kohya_files} == {2 + 3 * 75}
    a = unet_weights(tmp_path / "comfy" / "train" / "model")
    b = unet_weights(tmp_path / "kohya" / "train" / "model")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_long_prompt_mode_is_refused_by_name(tmp_path):
    data = repo_params()
    data["models"]["long_prompt_mode"] = "comfy"
    with pytest.raises(ConfigError, match=r"models\.long_prompt_mode: .*'kohya', 'comfyui' or 'a1111'"):
        load_params(write(tmp_path, data))
    with pytest.raises(ValueError, match="long prompt mode"):
        encode_prompts([], [], [SHORT], mode="comfy")


def test_shuffled_captions_in_a1111_mode_train_whatever_count_they_cut_into(pipe, tmp_path, tiny_models):
    parts = [" ".join([word] * n) for word, n in (("green", 20), ("red", 60), ("blue", 60))]
    as_written = ", ".join(parts)
    shuffled = ", ".join([parts[1], parts[0], parts[2]])
    # A1111 cuts the caption as written into 2 chunks, shuffled into 3 (its commas fall elsewhere).
    assert chunks_needed(encoders(pipe)[1], [as_written, shuffled], 225, "a1111") == [2, 3]
    files = {f"img{i}.png": encode(noise(96, 96, seed=500 + i), "PNG", dpi=(96, 96)) for i in range(4)}
    captions = make_caption_dir(tmp_path, files, [as_written, "a poster 1", "a poster 2", "a poster 3"])
    models = tiny_params(tiny_models).model_copy(update={"max_token_length": 225, "long_prompt_mode": "a1111"})
    run_train(train_params(tmp_path / "run", shuffle_caption=True), models, captions, progress=False)
    assert (tmp_path / "run" / "train" / "model").is_dir()
