"""Signed webhook delivery to client-supplied URLs, per Standard Webhooks.

The body is signed with every active secret (old and new during a rotation) and POSTed to the
one address ``chatjobs.ssrf.resolve`` checked: the request URL carries that IP, the Host
header and TLS SNI carry the real hostname, redirects are never followed, and the whole
attempt has a wall-clock deadline. Nothing here logs bodies or secrets.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import http.cookiejar
import math
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from secrets import token_bytes
from types import TracebackType
from typing import Any

import httpx

from chatjobs.ssrf import Allowlist, Resolver, Target, WebhookResolveError, WebhookUrlRefused
from chatjobs.ssrf import resolve as resolve_target
from chatjobs.upstream import retry_after as upstream_retry_after

SECRET_PREFIX = "whsec_"
USER_AGENT = "chatjobs-webhooks/1"
MAX_RETRY_AFTER = 86400.0  # seconds; longer asks are capped


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(32)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        # The message must not echo the secret.
        raise ValueError("webhook secret is not whsec_ followed by base64") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64 HMAC-SHA256>`` signature of ``{msg_id}.{timestamp}.{body}``."""
    if not msg_id or not (msg_id.isascii() and msg_id.isprintable()):
        # The id is sent as a header value: no line breaks, nothing outside ASCII.
        raise ValueError("webhook message id must be non-empty printable ASCII")
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value: one signature per active secret, space-separated."""
    if not secrets:
        raise ValueError("at least one webhook secret is needed to sign")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in dict.fromkeys(secrets))


def build_headers(
    msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str]
) -> dict[str, str]:
    """The headers of one delivery attempt; ``timestamp`` is Unix seconds at sending."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        "user-agent": USER_AGENT,
    }


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery attempt came to; ``error`` is None only for a 2xx answer."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    blocked: bool = False
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        """The receiver answered 2xx."""
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        """The receiver answered 410: it asks for no more deliveries."""
        return self.status_code == 410


def build_client(*, timeout: float = 15.0, max_connections: int = 100) -> httpx.Client:
    """A client fit for untrusted receivers; build one per worker (or thread) and reuse it.

    It ignores proxy and certificate environment variables, never follows redirects, and
    keeps no cookies and no idle connections, so one receiver cannot affect another.
    """
    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        cookies=no_cookies,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
    )


def deliver(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allow: Allowlist,
    timeout: float = 15.0,
    client: httpx.Client | None = None,
    resolver: Resolver = socket.getaddrinfo,
) -> DeliveryResult:
    """POST a signed body to a webhook URL once; never raises for network trouble.

    The URL is checked and its host resolved first; a refused URL or address gives
    ``blocked=True`` without any connection. A 3xx is returned as a failure, not followed.
    ``timeout`` bounds the whole attempt, resolution aside. A caller's ``client`` should come
    from ``build_client``: proxies, cookies or HTTP/2 on a general client undo its guarantees.
    """
    started = time.monotonic()
    try:
        target = resolve_target(url, allow, resolver=resolver)
    except WebhookUrlRefused as exc:
        return DeliveryResult(None, _elapsed_ms(started), error=str(exc), blocked=True)
    except WebhookResolveError as exc:
        return DeliveryResult(None, _elapsed_ms(started), error=str(exc))
    http_client = client if client is not None else build_client(timeout=timeout)
    try:
        return _post(http_client, target, body, headers, timeout=timeout, started=started)
    finally:
        if client is None:
            http_client.close()


def _post(
    client: httpx.Client,
    target: Target,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    started: float,
) -> DeliveryResult:
    request_headers = httpx.Headers(headers)
    request_headers["host"] = target.host_header
    # A fresh connection per delivery: the pool is keyed by IP, so a kept-alive connection
    # verified for one hostname would otherwise carry another hostname's request.
    request_headers["connection"] = "close"
    with _Deadline(timeout) as deadline:
        extensions: dict[str, Any] = {"trace": deadline.trace}
        if target.scheme == "https" and not target.host_is_ip:
            # TLS verifies the certificate against the real name; the socket goes to the IP.
            extensions["sni_hostname"] = target.host.rstrip(".")
        request = client.build_request(
            "POST",
            target.url,
            content=body,
            headers=request_headers,
            timeout=httpx.Timeout(timeout),
            extensions=extensions,
        )
        try:
            # Streamed so that only the status line and headers are read, never the body.
            response = client.send(request, stream=True, follow_redirects=False)
        except httpx.TransportError as exc:
            return DeliveryResult(
                None, _elapsed_ms(started), error=_describe(exc, timeout, deadline.expired)
            )
    response.close()
    return _result(response, started)


def _result(response: httpx.Response, started: float) -> DeliveryResult:
    status = response.status_code
    if 200 <= status < 300:
        error = None
    elif 300 <= status < 400:
        error = "redirect not followed"
    else:
        error = f"receiver answered {status}"
    wait = _retry_after(response.headers) if status in (429, 503) else None
    return DeliveryResult(status, _elapsed_ms(started), error=error, retry_after=wait)


def _retry_after(headers: httpx.Headers) -> float | None:
    # The receiver is untrusted: a malformed or infinite Retry-After means "no hint", and a
    # huge one is capped so that a scheduler adding it to a timestamp cannot overflow.
    try:
        wait = upstream_retry_after(headers)
    except (ValueError, OverflowError):
        return None
    if wait is None or not math.isfinite(wait):
        return None
    return min(wait, MAX_RETRY_AFTER)


_TIMEOUT_PHASES: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "waiting for a connection"),
)


def _describe(exc: httpx.TransportError, timeout: float, deadline_expired: bool) -> str:
    for cls, phase in _TIMEOUT_PHASES:
        if isinstance(exc, cls):
            return f"timed out after {timeout:g}s ({phase})"
    if deadline_expired:
        # The deadline shut the socket, so the error httpx saw is a mere disconnect.
        return f"timed out after {timeout:g}s (total deadline)"
    detail = str(exc)[:200] or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {detail}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"protocol error: {detail}"
    return f"{type(exc).__name__}: {detail}"


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


class _Deadline:
    """Shuts the connection's socket when the attempt's total time runs out.

    httpx timeouts bound each network operation, so a receiver that drips its headers a byte
    at a time would hold a worker indefinitely; this bounds the whole attempt.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook: remember the socket of each stream the connection opens."""
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is None:
            return
        # The plain socket's shutdown, even for TLS: it wakes a blocked read without touching
        # the SSL object the other thread is using. OSError: the attempt already ended.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
