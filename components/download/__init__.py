"""Download stage: URL lists in, a content-addressed image store and a manifest out.

One concern per module, as in img2dataset: `sources` reads URL lists, `fetch` talks HTTP
(safely and politely), `store` writes content-addressed files, `journal` records outcomes,
`worker` runs one fetching process, `stage` distributes the work and writes the manifest.
"""

from __future__ import annotations

__all__ = ["run_download"]


def __getattr__(name: str):
    # Lazy, so that worker processes importing components.download.worker skip pandas and the stage.
    if name == "run_download":
        from components.download.stage import run_download

        return run_download
    raise AttributeError(name)
