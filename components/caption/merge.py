"""From captioner outputs to the caption training reads: hygiene, template, CLIP token count.

Hygiene: tag underscores become spaces (kaomoji like ^_^ keep theirs), BLIP large's made-up words
("arafed", "araffe") are dropped, the replacement table applies to every part and the word table to
every word, repeated parts are dropped. The template joins the trigger, the source's
own caption or BLIP's, and the tags (most confident first), as comma-separated parts, so that
`keep_tokens` in training keeps the most important ones in place.
"""

from __future__ import annotations

import re
from functools import lru_cache

KAOMOJI = re.compile(r"^[^a-zA-Z0-9]*_[^a-zA-Z0-9]*$")  # e.g. ^_^, >_<, o_o keep their underscores
PLACEHOLDERS = ("trigger", "source", "blip", "source_or_blip", "tags")
# BLIP large's artefacts (from LAION's alt texts): "arafed woman", "an araffe poster". The article
# before one is kept and made to agree with the word that now follows it.
BLIP_ARTEFACT = re.compile(r"\b(?:(an?)\s+)?ara+f+(?:e|ed|es)\b\s*(\w?)", re.IGNORECASE)


def drop_blip_artefacts(text: str) -> str:
    def keep(match: re.Match) -> str:
        article, following = match.group(1), match.group(2)
        if article is None or not following:  # nothing left for the article to go with
            return following
        return ("an " if following.lower() in ("a", "e", "i", "o", "u") else "a ") + following

    return " ".join(BLIP_ARTEFACT.sub(keep, text).split())


def word_replacer(words: dict[str, str]):
    """A function applying `words` to whole words (never inside a longer one); longest first."""
    if not words:
        return lambda text: text
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?!\w)"
    )
    return lambda text: pattern.sub(lambda m: words[m.group(1)], text)


def normalize_tag(tag: str) -> str:
    tag = tag.strip()
    if KAOMOJI.match(tag) or (len(tag) <= 3 and "_" in tag):
        return tag
    return tag.replace("_", " ")


def clean_part(text: str, replacements: dict[str, str], words=lambda text: text) -> str:
    text = " ".join(text.split())
    return " ".join(words(replacements.get(text, text)).split())


def merge_caption(
    template: str,
    *,
    trigger: str | None,
    source: str | None,
    blip: str | None,
    tags: list[str],
    replacements: dict[str, str],
    exclude: list[str] = (),
    max_tags: int | None = None,
    word_replacements: dict[str, str] | None = None,
) -> str:
    """Fill the template; split on commas; clean, drop empty and repeated parts; join with ', '."""
    excluded = {normalize_tag(t).lower() for t in exclude}
    words = word_replacer(word_replacements or {})
    tag_parts: dict[str, None] = {}  # in order, without repeats
    for tag in tags:
        if max_tags is not None and len(tag_parts) >= max_tags:
            break  # tags come most confident first: the rest would be cut (a loose threshold passes hundreds)
        part = clean_part(normalize_tag(tag), replacements, words)
        if part and part.lower() not in excluded:
            tag_parts[part] = None
    values = {
        "trigger": trigger or "",
        "source": source or "",
        "blip": drop_blip_artefacts(blip or ""),
        "source_or_blip": source or drop_blip_artefacts(blip or ""),
        "tags": ", ".join(tag_parts),
    }
    text = template.format(**values)
    parts, seen = [], set()
    for raw in text.split(","):
        part = clean_part(raw, replacements, words)
        if part and part.lower() not in seen:
            seen.add(part.lower())
            parts.append(part)
    return ", ".join(parts)


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_ids(text: str) -> list[int]:
    """CLIP token ids of the text, without <BOS> and <EOS>: what models.max_token_length (75, 150, 225) counts."""
    return _clip_tokenizer().encode(text)


def clip_token_count(text: str) -> int:
    return len(clip_token_ids(text))


def clip_comma_id() -> int:
    from components.sdxl.prompt_encoding import COMMA_TOKEN

    return _clip_tokenizer().encoder[COMMA_TOKEN]
