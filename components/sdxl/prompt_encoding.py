"""SDXL prompt encoding, with prompts longer than CLIP's 75 tokens read in chunks the way kohya
sd-scripts, ComfyUI or AUTOMATIC1111 read them (`models.long_prompt_mode`).

CLIP's text encoders read 77 tokens: <BOS>, 75 tokens, <EOS>. With `max_token_length` 150 or 225
(`models.max_token_length`), a longer prompt is cut into (at most 2 or 3) chunks of up to 75 tokens,
each encoded as its own 77-token sequence (<BOS>, the chunk, <EOS>, padding), and the hidden states
are joined by mode:

- `kohya` (sd-scripts' `get_hidden_states_sdxl`; OneTrainer joins the same way): chunks of exactly
  75 tokens; <BOS>, every chunk's 75 inner states, the last chunk's final state (2 + 75 n states).
- `comfyui` (ComfyUI's `SDTokenizer.tokenize_with_weights`): the same 75-token chunks (ComfyUI
  tokenizes a prompt segment whole and cuts it every 75 tokens; older versions split the text at
  spaces and moved a word of under 8 tokens that did not fit on to the next chunk); every chunk's
  77 states, concatenated (77 n).
- `a1111` (AUTOMATIC1111's and Forge's `tokenize_line`): when a chunk is full and a comma is among
  its last 20 tokens (`comma_padding_backtrack`), the chunk ends after that comma, padded, and the
  tokens after the comma start the next chunk; 77 n states.

Padding is the tokenizer's (SDXL: <EOS> for the first encoder, "!", id 0, for the second), as in
both tools. In every mode the pooled embedding is the first chunk's, a prompt reads at most
max_token_length / 75 chunks (later ones are cut), and "" is one chunk. A prompt of up to 75 tokens
is one chunk, encoded exactly as StableDiffusionXLPipeline.encode_prompt does, whatever the mode.
Weights and emphasis (`(word:1.2)`), textual-inversion embeddings and BREAK are not interpreted:
the text is read as plain text (brackets are ordinary characters), as the tools read it with
weights off.

Training and generation both encode here. A batch needs one length (`n_chunks`). `kohya` pads a
prompt with empty chunks (the encoding of ""), as sd-scripts pads to the longest caption. The 77 n
modes instead repeat each prompt's states along the token axis to the least common multiple of the
chunk counts, as ComfyUI does: repeating every key and value r times leaves cross-attention's
softmax output unchanged (empty chunks would add keys and change it), so each prompt conditions as
if encoded alone. Training uses one length for the whole training set (so cached embeddings stack),
generation the length each prompt and its negative need.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch

CHUNK = 75  # tokens between <BOS> and <EOS>
MAX_TOKEN_LENGTHS = (75, 150, 225)
LongPromptMode = Literal["kohya", "comfyui", "a1111"]
LONG_PROMPT_MODES: tuple[LongPromptMode, ...] = ("kohya", "comfyui", "a1111")
COMMA_TOKEN = ",</w>"  # CLIP's BPE token for a comma at the end of a word (the same id in every CLIP tokenizer)
A1111_COMMA_BACKTRACK = 20  # AUTOMATIC1111's comma_padding_backtrack default


def _a1111_chunks(ids: list[int], comma: int | None) -> list[list[int]]:
    """AUTOMATIC1111's cut: when a 76th token arrives at a full chunk that has a comma among its last
    A1111_COMMA_BACKTRACK tokens, the chunk ends after the comma and the tokens after it move on."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1  # index of the current chunk's last comma, -1: none
    for token in ids:
        if token == comma:
            last_comma = len(chunk)
        elif len(chunk) == CHUNK and last_comma >= 0 and CHUNK - last_comma <= A1111_COMMA_BACKTRACK:
            chunks.append(chunk[: last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1 :], -1
        if len(chunk) == CHUNK:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(token)
    return [*chunks, chunk] if chunk or not chunks else chunks


def split_chunks(
    tokenizer, texts: list[str], max_token_length: int, mode: LongPromptMode = "kohya"
) -> list[list[list[int]]]:
    """Each text's chunks as `mode` cuts them: lists of at most 75 tokens without <BOS>/<EOS>, at
    least one (empty for ""), at most max_token_length / 75 (the later ones are not read)."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer.get_vocab().get(COMMA_TOKEN) if mode == "a1111" else None
    return [token_chunks(row, max_token_length, mode, comma) for row in ids]


def token_chunks(ids: list[int], max_token_length: int, mode: LongPromptMode, comma: int | None) -> list[list[int]]:
    """One text's token ids (no <BOS>/<EOS>) cut into the chunks `mode` reads: see `split_chunks`.
    `comma` is the id of CLIP's "," token (a1111 breaks after it)."""
    if mode == "a1111":
        chunks = _a1111_chunks(ids, comma)
    else:  # kohya and ComfyUI: every 75 tokens
        chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    return chunks[: max_token_length // CHUNK]


def tokens_read(ids: list[int], max_token_length: int, mode: LongPromptMode, comma: int | None) -> int:
    """How many of a text's tokens reach the encoders: fewer than len(ids) when the text is cut. In
    a1111 mode a text of max_token_length tokens or fewer can be cut too: a comma break pads a chunk."""
    return sum(len(chunk) for chunk in token_chunks(ids, max_token_length, mode, comma))


def chunks_needed(tokenizers, texts: list[str], max_token_length: int, mode: LongPromptMode = "kohya") -> list[int]:
    """How many chunks each text needs (at least 1), the most of any of the encoders' tokenizers."""
    counts = [1] * len(texts)
    for tokenizer in tokenizers:
        for i, chunks in enumerate(split_chunks(tokenizer, texts, max_token_length, mode)):
            counts[i] = max(counts[i], len(chunks))
    return counts


def common_chunk_count(counts: list[int], mode: LongPromptMode = "kohya") -> int:
    """The length, in chunks, that texts needing `counts` chunks are encoded at together: kohya pads
    to the longest with empty chunks, the 77 n modes repeat each to the least common multiple."""
    return max(counts) if mode == "kohya" else math.lcm(*counts)


def chunk_row(tokenizer, part: list[int]) -> list[int]:
    """One chunk's 77 token ids: <BOS>, its tokens, <EOS>, then the tokenizer's padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [pad] * (CHUNK - len(part))


def chunk_ids(
    tokenizer, texts: list[str], max_token_length: int, n_chunks: int, mode: LongPromptMode = "kohya"
) -> torch.Tensor:
    """(batch, n_chunks, 77) token ids: each text's chunks, then empty ones (or cut at n_chunks)."""
    rows = []
    for chunks in split_chunks(tokenizer, texts, max_token_length, mode):
        rows.append([chunk_row(tokenizer, part) for part in (chunks + [[]] * n_chunks)[:n_chunks]])
    return torch.tensor(rows, dtype=torch.long)


def _joined(
    text_encoders, tokenizers, texts: list[str], max_token_length: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya: <BOS>, every chunk's inner states, the last chunk's final state; short texts padded with empty chunks."""
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
    return torch.cat(hidden_states, dim=-1), pooled


def _concatenated(
    text_encoders, tokenizers, texts: list[str], max_token_length: int, mode: LongPromptMode, need: list[int], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI / AUTOMATIC1111: every chunk's 77 states in order, repeated along the tokens to n chunks."""
    if any(n % k for k in need):
        raise ValueError(f"n_chunks {n} is not a multiple of every text's chunk count {need}")
    first = list(itertools.accumulate([0, *need[:-1]]))  # each text's first chunk in the encoder's batch
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        # Only the texts' own chunks are encoded (a text gets an empty one only where this tokenizer cut fewer).
        rows = [
            chunk_row(tokenizer, part)
            for chunks, k in zip(split_chunks(tokenizer, texts, max_token_length, mode), need, strict=True)
            for part in (chunks + [[]] * k)[:k]
        ]
        out = encoder(torch.tensor(rows, dtype=torch.long, device=encoder.device), output_hidden_states=True)
        per_text = out.hidden_states[-2].split(need)  # (k, 77, width) each
        # Tiled, as ComfyUI repeats: cross-attention reads keys as a set, so r copies of each weigh as one.
        hidden_states.append(torch.cat([s.reshape(1, -1, s.shape[-1]).repeat(1, n // len(s), 1) for s in per_text]))
        pooled = out[0][first]  # text_embeds of each text's first chunk (the second encoder's is kept)
    return torch.cat(hidden_states, dim=-1), pooled


def encode_prompts(
    text_encoders,
    tokenizers,
    texts: list[str],
    max_token_length: int = 75,
    n_chunks: int | None = None,
    zero_empty: bool = False,
    mode: LongPromptMode = "kohya",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of SDXL's two encoders: each one's penultimate hidden
    states, concatenated; the pooled projection of the second. Long prompts are chunked and joined
    as `mode` does (module docstring); weights such as `(word:1.2)` are not interpreted.

    `n_chunks` is the length in chunks (default: `common_chunk_count` of the texts). kohya pads every
    text to it with empty chunks (a longer text's tail is cut); the 77 n modes repeat each text's
    states to it, so it must be a multiple of every text's chunk count.
    With `zero_empty`, an empty text is conditioned as SDXL's unconditional branch: all zeros
    (force_zeros_for_empty_prompt; training's caption dropout).
    """
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    if mode not in LONG_PROMPT_MODES:
        raise ValueError(f"long prompt mode must be one of {LONG_PROMPT_MODES}, got {mode!r}")
    need = chunks_needed(tokenizers, texts, max_token_length, mode)
    n = n_chunks or common_chunk_count(need, mode)
    if mode == "kohya":
        prompt_embeds, pooled = _joined(text_encoders, tokenizers, texts, max_token_length, n)
    else:
        prompt_embeds, pooled = _concatenated(text_encoders, tokenizers, texts, max_token_length, mode, need, n)
    if zero_empty:
        blank = torch.tensor([t == "" for t in texts], device=prompt_embeds.device)
        if blank.any():
            prompt_embeds = prompt_embeds.masked_fill(blank[:, None, None], 0.0)
            pooled = pooled.masked_fill(blank[:, None], 0.0)
    return prompt_embeds, pooled
