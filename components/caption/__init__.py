"""Caption stage: BLIP captions and WD-style tags, merged into one training caption per image.

`blip` and `tagger` are the two captioners (each batched, each cached per image and config),
`merge` turns their outputs and the source's own caption into the caption training reads,
and `stage` runs them resumably and writes the table and the report.
"""

from __future__ import annotations

__all__ = ["run_caption"]


def __getattr__(name: str):
    if name == "run_caption":
        from components.caption.stage import run_caption

        return run_caption
    raise AttributeError(name)
