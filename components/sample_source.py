"""The bundled sample image site for the offline demo and tests.

Real photographs that scikit-image ships, resized and re-encoded so that the demo's URL lists
(data/sources/*.csv) cover every outcome: images that pass validation, and images that fail each
rule (too small, too large, low DPI, no DPI, too few KB per pixel, truncated), plus an HTML page
behind a .jpg URL, a missing file (404), the same bytes at two URLs, and a row with no URL.
The bytes are deterministic for the pinned Pillow, so the demo is reproducible.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageFilter

from components.plumbing.fsutil import atomic_dir, atomic_write_json

SITE_VERSION = 1
TV_PREFIX_PATH = "/t/p/w600_and_h900_bestv2"


@dataclass(frozen=True)
class SampleFile:
    path: str  # URL path on the site
    expect: str  # what the pipeline should make of it (documentation and tests)
    make: Callable[[], bytes]


def _skimage(name: str) -> Image.Image:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)())
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png(name: str, size: tuple[int, int] | None = None, dpi: int | None = 96, mode: str | None = None):
    def make() -> bytes:
        image = _skimage(name)
        if mode:
            image = image.convert(mode)
        if size:
            image = image.resize(size, Image.LANCZOS)
        return _encode(image, "PNG", **({"dpi": (dpi, dpi)} if dpi else {}))

    return make


def _jpeg(name: str, size: tuple[int, int] | None = None, dpi: int = 96, quality: int = 100, blur: float = 0):
    def make() -> bytes:
        image = _skimage(name)
        if size:
            image = image.resize(size, Image.LANCZOS)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        return _encode(image, "JPEG", quality=quality, subsampling=0, dpi=(dpi, dpi))

    return make


def _poster(name: str, fmt: str):
    """A 600x900 poster crop, the size of TMDB's w600_and_h900 posters."""

    def make() -> bytes:
        image = _skimage(name)
        scale = max(600 / image.width, 900 / image.height)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        left, top = (image.width - 600) // 2, (image.height - 900) // 2
        image = image.crop((left, top, left + 600, top + 900))
        if fmt == "PNG":
            return _encode(image, "PNG", dpi=(144, 144))
        return _encode(image, "JPEG", quality=100, subsampling=0, dpi=(144, 144))

    return make


def _truncated(name: str):
    def make() -> bytes:
        data = _jpeg(name, size=(768, 512), dpi=96)()
        return data[: len(data) * 3 // 5]

    return make


def _html() -> bytes:
    return b"<!doctype html><html><head><title>Not an image</title></head><body>Sorry.</body></html>\n"


SAMPLE_FILES: tuple[SampleFile, ...] = (
    SampleFile("/images/astronaut.png", "accepted", _png("astronaut")),
    SampleFile("/images/astronaut-mirror.png", "duplicate of astronaut.png", _png("astronaut")),
    SampleFile("/images/coffee.jpg", "accepted", _jpeg("coffee", size=(768, 512), dpi=150)),
    SampleFile("/images/rocket.png", "accepted", _png("rocket", size=(768, 512))),
    SampleFile("/images/hubble.png", "accepted", _png("hubble_deep_field")),
    SampleFile("/images/cells.png", "accepted", _png("immunohistochemistry", dpi=300)),
    SampleFile("/images/camera.png", "accepted (greyscale)", _png("camera", mode="L")),
    SampleFile("/images/chelsea-small.png", "rejected: width, height", _png("chelsea")),
    SampleFile("/images/retina.png", "rejected: width, height", _png("retina")),
    SampleFile("/images/coffee-72dpi.jpg", "rejected: dpi", _jpeg("coffee", size=(768, 512), dpi=72)),
    SampleFile("/images/rocket-nodpi.png", "rejected: dpi_missing", _png("rocket", size=(768, 512), dpi=None)),
    SampleFile(
        "/images/coffee-lowq.jpg",
        "rejected: kb_per_pixel",
        _jpeg("coffee", size=(768, 512), quality=15, blur=4),
    ),
    SampleFile("/images/chelsea-truncated.jpg", "rejected: decodable", _truncated("chelsea")),
    SampleFile("/images/about.jpg", "download: not_image", _html),
    SampleFile(f"{TV_PREFIX_PATH}/kR2qzs1pAsYx.png", "accepted", _poster("chelsea", "PNG")),
    SampleFile(f"{TV_PREFIX_PATH}/vN7fcbXoGmTq.jpg", "accepted", _poster("coffee", "JPEG")),
    SampleFile(f"{TV_PREFIX_PATH}/Lw3hQe9uZa0d.png", "accepted", _poster("rocket", "PNG")),
)


def build_site(site_dir: Path | str, force: bool = False) -> Path:
    """Write the sample site's files under `site_dir` (idempotent; atomic)."""
    site_dir = Path(site_dir)
    marker = site_dir / "site.json"
    if marker.is_file() and not force:
        import json

        if json.loads(marker.read_text()).get("version") == SITE_VERSION:
            return site_dir
    with atomic_dir(site_dir) as tmp:
        for sample in SAMPLE_FILES:
            target = tmp / sample.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(sample.make())
        atomic_write_json(
            tmp / "site.json",
            {"version": SITE_VERSION, "files": {s.path: s.expect for s in SAMPLE_FILES}},
        )
    return site_dir


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


class SampleSite:
    """Serves a built site on host:port from a background thread (`with SampleSite(...) as site:`)."""

    def __init__(self, site_dir: Path | str, host: str = "127.0.0.1", port: int = 8765) -> None:
        handler = functools.partial(_QuietHandler, directory=str(site_dir))
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="sample-site", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SampleSite:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> SampleSite:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
