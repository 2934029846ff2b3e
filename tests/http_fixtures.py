"""A deliberately misbehaving HTTP server on 127.0.0.1 for the download tests."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from PIL import Image


def png_bytes(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG", dpi=(96, 96))
    return buf.getvalue()


RED = png_bytes()
BLUE = png_bytes((20, 40, 220))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    counters: ClassVar[dict[str, int]] = {}
    user_agents: ClassVar[list[str]] = []
    arrivals: ClassVar[list[float]] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/png", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path
        Handler.arrivals.append(time.monotonic())
        if path.startswith("/n/"):  # /n/<k>.png: distinct bytes per k (a valid PNG plus a trailer), a little slow
            time.sleep(0.02)
            k = path[3:].split(".")[0]
            self._send(200, RED + f"#{k}".encode())
            return
        Handler.user_agents.append(self.headers.get("User-Agent", ""))
        count = Handler.counters[path] = Handler.counters.get(path, 0) + 1
        if path in ("/red.png", "/dup/a.png", "/dup/b.png", "/final.png"):
            self._send(200, RED)
        elif path == "/blue.png":
            self._send(200, BLUE, ctype="text/plain")  # wrong header, real image: sniffing wins
        elif path == "/html.jpg":
            self._send(200, b"<!doctype html><html><body>nope</body></html>", ctype="image/jpeg")
        elif path == "/gone.png":
            self._send(404, b"not found", ctype="text/plain")
        elif path == "/error.png":
            self._send(500, b"boom", ctype="text/plain")
        elif path == "/hop1":
            self._redirect("/hop2")
        elif path == "/hop2":
            self._redirect("/final.png")
        elif path in ("/loop-a", "/loop-b"):
            self._redirect("/loop-b" if path == "/loop-a" else "/loop-a")
        elif path == "/to-private":
            self._redirect("http://10.255.255.1/x.png")  # refused before any connection is made
        elif path == "/busy.png":
            if count == 1:
                self._send(429, b"slow down", ctype="text/plain", headers={"Retry-After": "1"})
            else:
                self._send(200, BLUE)
        elif path == "/optout.png":
            self._send(200, RED, headers={"X-Robots-Tag": "noai, noimageai"})
        elif path == "/huge.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(500_000_000))
            self.end_headers()
        elif path == "/endless.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\x89PNG" + b"\x00" * 65532
            try:
                for _ in range(100):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except OSError:
                pass
        elif path == "/truncated.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(RED) + 5000))
            self.end_headers()
            self.wfile.write(RED)
            self.close_connection = True
        elif path == "/stall.png":
            time.sleep(3)  # longer than the tests' read timeout
            self._send(200, RED)
        elif path == "/drip.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(40):  # a byte every 0.2 s: never idle long enough to trip a read timeout
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        else:
            self._send(404, b"?", ctype="text/plain")


class MisbehavingServer:
    def __init__(self) -> None:
        Handler.counters = {}
        Handler.user_agents = []
        Handler.arrivals = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
