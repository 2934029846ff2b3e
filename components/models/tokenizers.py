"""Tokenizers without a hub: CLIP's BPE from the vocabulary open_clip ships, and a word-piece vocab.

transformers' CLIPTokenizer built from open_clip's `bpe_simple_vocab_16e6.txt.gz` gives exactly
open_clip's (and SDXL's) token ids: merges are lines 1..48,894 of that file; the vocabulary is the
256 byte symbols, the same with `</w>`, each merge joined, then the two special tokens (49,408).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bpe_merges() -> list[str]:
    with gzip.open(_bpe_file()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    return lines[1 : _NUM_MERGES + 1]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    from open_clip.tokenizer import bytes_to_unicode

    merges = _bpe_merges()
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>") -> None:
    """Save a CLIPTokenizer (SDXL's tokenizer uses pad `<|endoftext|>`, tokenizer_2 uses `!`)."""
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            str(vocab_file), str(merges_file), model_max_length=CLIP_CONTEXT_LENGTH, pad_token=pad_token
        )
        tokenizer.save_pretrained(str(out_dir))


def clip_words(limit: int) -> list[str]:
    """The first `limit` whole alphabetic words of the CLIP BPE merges (roughly by frequency)."""
    words: list[str] = []
    seen: set[str] = set()
    for merge in _bpe_merges():
        token = "".join(merge.split())
        if token.endswith("</w>"):
            word = token[: -len("</w>")]
            if re.fullmatch(r"[a-z]{2,}", word) and word not in seen:
                seen.add(word)
                words.append(word)
                if len(words) == limit:
                    break
    return words


def save_wordpiece_vocab(path: Path, words: int = 3000) -> list[str]:
    """A BERT-style vocab.txt: BERT's special tokens, then common English words from CLIP's BPE."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    punctuation = list(".,;:!?'\"-()/&")
    digits = list("0123456789")
    tokens = specials + punctuation + digits + clip_words(words)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens
