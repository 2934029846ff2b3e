"""An image server on 127.0.0.1 that adds a fixed latency to every request, to mimic the internet.

`/img/<k>.<ext>` serves corpus file k mod N with a per-k trailer after the image data (still a
valid image), so every URL's bytes are distinct even when there are more URLs than files.
Run as its own process: python benchmarks/download/server.py --dir D --port P --latency 0.05
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web


def make_app(folder: Path, latency: float) -> web.Application:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    blobs = [p.read_bytes() for p in files]
    kinds = ["image/png" if p.suffix == ".png" else "image/jpeg" for p in files]

    async def image(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)
        k = int(request.match_info["k"])
        i = k % len(blobs)
        return web.Response(body=blobs[i] + f"#{k}".encode(), content_type=kinds[i])

    app = web.Application()
    app.router.add_get(r"/img/{k:\d+}.{ext}", image)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    web.run_app(
        make_app(Path(args.dir), args.latency),
        host="127.0.0.1",
        port=args.port,
        print=None,
        backlog=2048,
        access_log=None,
    )


if __name__ == "__main__":
    main()
