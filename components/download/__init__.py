"""Download stage: URL lists in, a content-addressed image store and a manifest out.

One concern per module, as in img2dataset: `sources` reads URL lists, `fetch` talks HTTP
(safely and politely), `store` writes content-addressed files, `stage` ties them together and
writes the manifest and metrics.
"""

from components.download.stage import run_download

__all__ = ["run_download"]
