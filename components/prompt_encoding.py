"""SDXL prompt encoding, with kohya's chunked CLIP encoding for prompts longer than CLIP's 75 tokens.

CLIP's text encoders read 77 tokens: <BOS>, 75 tokens, <EOS>. With `max_token_length` 150 or 225
(`models.max_token_length`), a longer prompt is cut into chunks of 75 tokens, each encoded as its
own 77-token sequence; the hidden states are joined back as <BOS>, every chunk's 75 inner states,
and the last chunk's final state (2 + 75 n states; kohya sd-scripts' `get_hidden_states_sdxl`).
The pooled embedding is the first chunk's. With one chunk this is exactly what
StableDiffusionXLPipeline.encode_prompt computes, so a prompt of up to 75 tokens is encoded as
before whatever the setting.

Training and generation both encode here. A batch needs one chunk count: `n_chunks` pads a
prompt with empty chunks (the encoding of ""); training uses one count for the whole training set
(so cached embeddings stack), generation the count each prompt and its negative need.
"""

from __future__ import annotations

import math

import torch

CHUNK = 75  # tokens between <BOS> and <EOS>
MAX_TOKEN_LENGTHS = (75, 150, 225)


def content_ids(tokenizer, texts: list[str], max_token_length: int) -> list[list[int]]:
    """Each text's tokens without <BOS>/<EOS>, cut at `max_token_length`."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [row[:max_token_length] for row in ids]


def chunks_needed(tokenizers, texts: list[str], max_token_length: int) -> list[int]:
    """How many chunks each text needs (at least 1), by the longest tokenization of the encoders."""
    counts = [0] * len(texts)
    for tokenizer in tokenizers:
        for i, row in enumerate(content_ids(tokenizer, texts, max_token_length)):
            counts[i] = max(counts[i], len(row))
    return [max(1, math.ceil(c / CHUNK)) for c in counts]


def chunk_ids(tokenizer, texts: list[str], max_token_length: int, n_chunks: int) -> torch.Tensor:
    """(batch, n_chunks, 77) token ids: each chunk <BOS> + its 75 tokens + <EOS>, padded as the tokenizer pads."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = CHUNK + 2
    rows = []
    for content in content_ids(tokenizer, texts, max_token_length):
        chunks = []
        for c in range(n_chunks):
            part = content[c * CHUNK : (c + 1) * CHUNK]
            chunks.append([bos, *part, eos] + [pad] * (width - 2 - len(part)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def encode_prompts(
    text_encoders,
    tokenizers,
    texts: list[str],
    max_token_length: int = 75,
    n_chunks: int | None = None,
    zero_empty: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of SDXL's two encoders: each one's penultimate hidden
    states, concatenated; the pooled projection of the second.

    `n_chunks` (default: what the longest text needs) must cover every text, or its tail is cut.
    With `zero_empty`, an empty text is conditioned as SDXL's unconditional branch: all zeros
    (force_zeros_for_empty_prompt; training's caption dropout).
    """
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    n = n_chunks or max(chunks_needed(tokenizers, texts, max_token_length))
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = chunk_ids(tokenizer, texts, max_token_length, n).to(encoder.device)
        batch = ids.shape[0]
        out = encoder(ids.reshape(batch * n, -1), output_hidden_states=True)
        states = out.hidden_states[-2].reshape(batch, n, ids.shape[-1], -1)
        inner = states[:, :, 1:-1].reshape(batch, n * CHUNK, states.shape[-1])
        hidden_states.append(torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1))
        # For CLIPTextModelWithProjection out[0] is text_embeds (pooled at <EOS>): the first chunk's.
        pooled = out[0].reshape(batch, n, *out[0].shape[1:])[:, 0]
    prompt_embeds = torch.cat(hidden_states, dim=-1)
    if zero_empty:
        blank = torch.tensor([t == "" for t in texts], device=prompt_embeds.device)
        if blank.any():
            prompt_embeds = prompt_embeds.masked_fill(blank[:, None, None], 0.0)
            pooled = pooled.masked_fill(blank[:, None], 0.0)
    return prompt_embeds, pooled
