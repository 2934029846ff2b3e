"""HTTP fetching: concurrent, polite and safe.

- asyncio + aiohttp: one event loop, a pool of workers, a global and a per-host concurrency
  limit and a per-host request rate;
- connect/read timeouts, an overall deadline per request (a slow drip cannot hold a worker),
  a maximum body size (checked against Content-Length and while streaming);
- retries with exponential backoff and jitter on timeouts, connection errors, 429 and 5xx,
  honouring `Retry-After`;
- redirects followed by hand, up to a limit, each hop re-checked;
- hosts resolving to private, loopback or link-local addresses refused at connect time (no
  DNS-rebinding window) unless their network is allowed;
- `X-Robots-Tag: noai` / `noimageai` respected; an honest User-Agent;
- the content type sniffed from the bytes, and the image header parsed, before a file is kept.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import os
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

TRANSIENT_HTTP = {429, 500, 502, 503, 504}
# Error classes a later run should try again; all others are final for the same input.
TRANSIENT_STATUSES = {
    "timeout",
    "connection_error",
    "http_429",
    "http_500",
    "http_502",
    "http_503",
    "http_504",
}


@dataclass(frozen=True)
class FetchSettings:
    concurrency: int = 16
    per_host_concurrency: int = 8
    per_host_rate: float = 0.0  # requests per second per host; 0 = unlimited
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    total_timeout_s: float = 60.0
    max_bytes: int = 25_000_000
    archive_timeout_s: float = 3600.0
    max_archive_bytes: int = 20_000_000_000
    max_redirects: int = 5
    retries: int = 2
    backoff_base_s: float = 0.5
    max_retry_after_s: float = 60.0
    verify_tls: bool = True
    allow_networks: tuple[str, ...] = ()
    robots_optout: tuple[str, ...] = ("noai", "noimageai")
    user_agent: str = "Easel/0.1"
    s3: object | None = None  # components.storage.S3Settings, for s3:// sources


@dataclass
class FetchResult:
    url: str
    status: str  # "ok" or an error class: timeout, http_404, not_image, too_large, ...
    error: str | None = None
    http_status: int | None = None
    final_url: str | None = None
    content: bytes | None = field(default=None, repr=False)
    image_type: str | None = None
    attempts: int = 0
    retry_after: float | None = field(default=None, repr=False)


class RefusedAddress(OSError):
    """The host resolves only to addresses that the settings do not allow."""


# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits: NAT64's well-known
# and local-use prefixes (RFC 6052, 8215) and SIIT's IPv4-translated form (::ffff:0:a.b.c.d, RFC 2765).
LAST_32_BITS_IPV4 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96")]


def embedded_ipv4(ip: ipaddress._BaseAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translator or tunnel, judged in its place:
    IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), NAT64, SIIT, 6to4 (2002:AABB:CCDD::)
    and Teredo (2001:0::/32: its server and its client). A host written `[::7f00:1]` is 127.0.0.1."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible (deprecated): ::a.b.c.d, not :: or ::1
        return [low32]
    if any(ip in net for net in LAST_32_BITS_IPV4):
        return [low32]
    return []


def _ip_allowed(ip: ipaddress._BaseAddress, allowed: list[ipaddress._BaseNetwork]) -> bool:
    if any(ip in net for net in allowed):
        return True
    embedded = embedded_ipv4(ip)
    if embedded:  # judged by where it leads
        return all(_ip_allowed(v4, allowed) for v4 in embedded)
    return ip.is_global and not ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves through the system resolver and drops addresses that are not public (or allowed)."""

    def __init__(self, allow_networks: Iterable[str]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allow_networks]

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        kept = [i for i in infos if _ip_allowed(ipaddress.ip_address(i["host"]), self._allowed)]
        if not kept:
            addrs = ", ".join(sorted({i["host"] for i in infos}))
            raise RefusedAddress(f"{host} resolves to {addrs}: private, loopback or link-local, not allowed")
        return kept

    async def close(self) -> None:
        await self._inner.close()


NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


def non_canonical_ip(host: str) -> bool:
    """A host that C resolvers read as an IPv4 address although it is not a dotted quad:
    `2852039166`, `0251.0376.0251.0376` (octal), `0xa9.254.169.254`, `169.254.43518`. No DNS name
    ends in a numeric label, so such a host is never a name; it is refused as invalid, not retried."""
    labels = host.rstrip(".").split(".")
    if not host or ":" in host or not NUMERIC_LABEL.fullmatch(labels[-1]):  # ":": an IPv6 literal
        return False
    try:
        ipaddress.IPv4Address(host)
        return False  # canonical: checked against the allowed networks like any address
    except ValueError:
        return True


def refused_host(url: str, allowed: list[ipaddress._BaseNetwork]) -> tuple[str, str] | None:
    """(status, reason) when a URL's host must not be connected to, checked before any connection:
    a numeric host that is not a dotted quad (`invalid_url`), or an IP literal (aiohttp skips the
    resolver for those) that is private, loopback or link-local, or leads to one (`private_address`)."""
    host = urlsplit(url).hostname or ""
    if non_canonical_ip(host):
        return "invalid_url", f"{host} is not a canonical IPv4 address (a.b.c.d)"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if _ip_allowed(ip, allowed):
        return None
    leads = embedded_ipv4(ip)
    via = f" (it leads to {', '.join(map(str, leads))})" if leads else ""
    return "private_address", f"{host} is a private, loopback or link-local address{via}, not allowed"


def sniff_image_type(head: bytes) -> str | None:
    """The image format from its first bytes (the Content-Type header is not trusted)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"BM":
        return "bmp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def backoff_delay(attempt: int, base: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, base * 2**attempt)."""
    return rng.uniform(0, base * (2**attempt))


class HostLimiter:
    """Per-host concurrency and request spacing."""

    def __init__(self, per_host: int, rate: float) -> None:
        self._per_host = per_host
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._next: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def semaphore(self, host: str) -> asyncio.Semaphore:
        if host not in self._sems:
            self._sems[host] = asyncio.Semaphore(self._per_host)
        return self._sems[host]

    async def wait_turn(self, host: str) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next.get(host, now))
            self._next[host] = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


class Fetcher:
    def __init__(self, settings: FetchSettings, rng_seed: int | None = None) -> None:
        self.settings = settings
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allow_networks]
        self._rng = random.Random(rng_seed)
        self._hosts = HostLimiter(settings.per_host_concurrency, settings.per_host_rate)
        self._s3 = None

    async def _one_attempt(self, session: aiohttp.ClientSession, url: str) -> FetchResult:
        """A single request chain (following redirects); no retries here."""
        s = self.settings
        current = url
        for _hop in range(s.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return FetchResult(url, "invalid_url", f"unsupported URL: {current[:200]}")
            refusal = refused_host(current, self._allowed)
            if refusal:
                return FetchResult(url, refusal[0], refusal[1], final_url=current)
            host = parts.hostname
            async with self._hosts.semaphore(host):
                await self._hosts.wait_turn(host)
                async with session.get(current, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        if not location:
                            return FetchResult(url, f"http_{resp.status}", "redirect without Location")
                        current = urljoin(current, location)
                        continue
                    return await self._read_response(url, current, resp)
        return FetchResult(url, "too_many_redirects", f"more than {s.max_redirects} redirects", final_url=current)

    async def _read_response(self, url: str, final_url: str, resp: aiohttp.ClientResponse) -> FetchResult:
        s = self.settings
        base = {"http_status": resp.status, "final_url": final_url}
        if resp.status != 200:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return FetchResult(url, f"http_{resp.status}", resp.reason or "", retry_after=retry_after, **base)
        robots = ",".join(resp.headers.getall("X-Robots-Tag", [])).lower()
        tokens = {t.strip() for part in robots.split(",") for t in part.split(":")[-1].split()}
        opted_out = sorted(tokens & set(s.robots_optout))
        if opted_out:
            return FetchResult(url, "robots_optout", f"X-Robots-Tag: {', '.join(opted_out)}", **base)
        if resp.content_length is not None:
            if resp.content_length > s.max_bytes:
                return FetchResult(url, "too_large", f"Content-Length {resp.content_length} > {s.max_bytes}", **base)
            body = await resp.read()  # the length is known and allowed: one read, no chunk loop
        else:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > s.max_bytes:
                    return FetchResult(url, "too_large", f"body exceeds {s.max_bytes} bytes", **base)
                chunks.append(chunk)
            body = b"".join(chunks)
        return self._checked_body(url, body, resp.headers.get("Content-Type", "?"), **base)

    def _checked_body(self, url: str, body: bytes, declared: str, **base) -> FetchResult:
        image_type = sniff_image_type(body[:32])
        if image_type is None:
            return FetchResult(url, "not_image", f"bytes are not an image (declared {declared})", **base)
        return FetchResult(url, "ok", None, content=body, image_type=image_type, **base)

    def _read_local(self, url: str) -> FetchResult:
        """A file:// URL from a local-folder source (configured by the user, so no address checks)."""
        from urllib.parse import unquote

        path = unquote(urlsplit(url).path)
        try:
            size = os.path.getsize(path)
            if size > self.settings.max_bytes:
                return FetchResult(url, "too_large", f"{size} bytes > {self.settings.max_bytes}")
            with open(path, "rb") as fh:
                body = fh.read()
        except OSError as exc:
            return FetchResult(url, "read_error", f"{type(exc).__name__}: {exc.strerror or exc}")
        return self._checked_body(url, body, "a local file")

    def _read_s3(self, url: str) -> FetchResult:
        from botocore.exceptions import BotoCoreError, ClientError

        from components.storage import make_client

        if self._s3 is None:
            if self.settings.s3 is None:
                return FetchResult(url, "invalid_url", "s3:// URL but no S3 settings")
            self._s3 = make_client(self.settings.s3)
        bucket, _, key = url[len("s3://") :].partition("/")
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
            if obj["ContentLength"] > self.settings.max_bytes:
                obj["Body"].close()
                return FetchResult(url, "too_large", f"{obj['ContentLength']} bytes > {self.settings.max_bytes}")
            body = obj["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            return FetchResult(url, "http_404" if code in ("NoSuchKey", "404") else f"s3_{code}", str(exc)[:300])
        except BotoCoreError as exc:
            return FetchResult(url, "connection_error", str(exc)[:300])
        return self._checked_body(url, body, obj.get("ContentType", "?"))

    async def fetch(self, session: aiohttp.ClientSession, url: str) -> FetchResult:
        """Fetch one URL with retries on transient failures (file:// and s3:// read directly)."""
        s = self.settings
        if url.startswith("file://"):
            return await asyncio.to_thread(self._read_local, url)
        if url.startswith("s3://"):
            return await asyncio.to_thread(self._read_s3, url)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(s.total_timeout_s):
                    result = await self._one_attempt(session, url)
            # aiohttp's own timeouts are TimeoutErrors too: name them before the overall deadline.
            except aiohttp.ConnectionTimeoutError:
                result = FetchResult(url, "timeout", f"no connection within {s.connect_timeout_s:g} s")
            except aiohttp.SocketTimeoutError:
                result = FetchResult(url, "timeout", f"no data for {s.read_timeout_s:g} s while reading the response")
            except aiohttp.ServerTimeoutError as exc:
                result = FetchResult(url, "timeout", str(exc) or "the server timed out")
            except TimeoutError:
                result = FetchResult(url, "timeout", f"no complete response in {s.total_timeout_s:g} s")
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
                return FetchResult(url, "tls_error", str(exc)[:300], attempts=attempt)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    return FetchResult(url, "private_address", str(exc.os_error), attempts=attempt)
                result = FetchResult(url, "connection_error", str(exc))
            except aiohttp.ClientPayloadError as exc:
                result = FetchResult(url, "truncated", f"body ended early: {exc}")
            except aiohttp.TooManyRedirects:
                result = FetchResult(url, "too_many_redirects", "redirect limit")
            except (aiohttp.ClientError, ValueError) as exc:
                result = FetchResult(url, "connection_error", f"{type(exc).__name__}: {exc}")
            result.attempts = attempt
            if result.status not in TRANSIENT_STATUSES or attempt > s.retries:
                return result
            delay = backoff_delay(attempt - 1, s.backoff_base_s, self._rng)
            if result.retry_after is not None:
                if result.retry_after > s.max_retry_after_s:
                    result.error = f"Retry-After {result.retry_after:g} s exceeds the {s.max_retry_after_s:g} s limit"
                    return result
                delay = max(delay, result.retry_after)
            await asyncio.sleep(delay)

    def session(self) -> aiohttp.ClientSession:
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=s.concurrency,
            limit_per_host=s.per_host_concurrency,
            resolver=GuardedResolver(s.allow_networks),
            ssl=s.verify_tls,  # True: verify certificates (the default); False only if params say so
            ttl_dns_cache=300,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
        headers = {"User-Agent": s.user_agent, "Accept": "image/*,*/*;q=0.5"}
        return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers, trust_env=False)

    async def run(
        self,
        urls: Iterable[str],
        on_result: Callable[[FetchResult], Awaitable[None] | None],
    ) -> None:
        """Fetch every URL with `concurrency` workers; call on_result as each one finishes. The URLs
        are taken from the iterable as workers get free, so a long list need not be in memory."""
        pending = iter(urls)

        async with self.session() as session:

            async def worker() -> None:
                # One event loop: no other worker runs between next() and the await, so no lock.
                for url in pending:
                    result = await self.fetch(session, url)
                    maybe = on_result(result)
                    if asyncio.iscoroutine(maybe):
                        await maybe

            workers = [asyncio.create_task(worker()) for _ in range(self.settings.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
