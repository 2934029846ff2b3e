"""Validate stage: an image metadata table, a Great Expectations suite over it, and curation.

`inspect` reads each image's header and decodes it once (integrity + perceptual hash), `rules`
builds the GX suite from params and turns its results into per-image reasons, `dedupe` groups
near-duplicates by perceptual hash, `normalize` writes training-ready copies of images that need
rotation or colour conversion, `curate` optionally keeps the best images by aesthetic score, and
`stage` ties them together and writes the manifests, metrics, Data Docs and the report, reading
the download manifest in chunks so that memory does not grow with the data set.
"""

from __future__ import annotations

__all__ = ["run_validate"]


def __getattr__(name: str):
    if name == "run_validate":
        from components.validate.stage import run_validate

        return run_validate
    raise AttributeError(name)
