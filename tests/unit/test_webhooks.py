"""Webhook signing (checked with the standardwebhooks library and the openai SDK), batch
events in OpenAI's shape, and delivery over real HTTP."""

from __future__ import annotations

import base64
import datetime
import email.utils
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.webhooks import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
)
from standardwebhooks import Webhook, WebhookVerificationError

from chatjobs.deliveries import BATCH_EVENTS
from chatjobs.ssrf import parse_allowlist
from chatjobs.testing import free_port
from chatjobs.webhooks import (
    DeliveryResult,
    build_client,
    build_headers,
    deliver,
    new_secret,
    sign,
    signature_header,
)
from worker.webhook import batch_event

SECRET = new_secret()
OLD_SECRET = new_secret()
BODY = json.dumps({"id": "job_1", "status": "succeeded"}).encode()
LOOPBACK = parse_allowlist("127.0.0.0/8")


def now() -> int:
    return int(time.time())


# --- signing --------------------------------------------------------------------------


def test_new_secret_is_whsec_and_32_random_bytes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert new_secret() != secret


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The example in the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_built_headers_verify_with_the_standardwebhooks_library() -> None:
    headers = build_headers("msg_1", now(), BODY, [SECRET])
    assert Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "chatjobs-webhooks/1"
    assert headers["webhook-id"] == "msg_1"


def test_during_rotation_either_secret_alone_verifies() -> None:
    headers = build_headers("msg_2", now(), BODY, [OLD_SECRET, SECRET])
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(OLD_SECRET).verify(BODY, headers)
    Webhook(SECRET).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_tampered_body_fails_verification() -> None:
    headers = build_headers("msg_3", now(), BODY, [SECRET])
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY.replace(b"succeeded", b"failed"), headers)


def test_tampered_timestamp_fails_verification() -> None:
    ts = now()
    headers = build_headers("msg_4", ts, BODY, [SECRET])
    headers["webhook-timestamp"] = str(ts - 1)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, headers)


def test_signing_refuses_no_secret_a_bad_secret_and_a_header_breaking_id() -> None:
    with pytest.raises(ValueError):
        signature_header([], "msg_5", now(), BODY)
    with pytest.raises(ValueError) as info:
        sign("whsec_not base64!", "msg_5", now(), BODY)
    assert "not base64!" not in str(info.value)
    with pytest.raises(ValueError):
        sign(SECRET, "msg\r\nx-evil: 1", now(), BODY)


# --- batch events: OpenAI's shape, so the official SDK verifies and parses them -----------

BATCH_EVENT_MODELS: dict[str, type[Any]] = {
    "batch.completed": BatchCompletedWebhookEvent,
    "batch.failed": BatchFailedWebhookEvent,
    "batch.expired": BatchExpiredWebhookEvent,
    "batch.cancelled": BatchCancelledWebhookEvent,
}
ENDED = datetime.datetime(2026, 11, 30, 12, 0, 0, 750000, tzinfo=datetime.UTC)


def openai_webhooks(secret: str) -> Any:
    return openai.OpenAI(api_key="x", webhook_secret=secret).webhooks


def test_a_batch_event_is_openais_event_in_compact_json() -> None:
    body = batch_event("batch.completed", "batch_1", event_id="evt_ab", created_at=ENDED)
    assert body == (
        '{"id":"evt_ab","object":"event","type":"batch.completed",'
        '"created_at":1796040000,"data":{"id":"batch_1"}}'
    )


def test_every_batch_event_type_is_one_the_openai_sdk_knows() -> None:
    assert set(BATCH_EVENT_MODELS) == BATCH_EVENTS


@pytest.mark.parametrize("event_type", sorted(BATCH_EVENT_MODELS))
def test_the_openai_sdk_unwraps_a_signed_batch_event_into_its_type(event_type: str) -> None:
    body = batch_event(event_type, "batch_2", event_id="evt_cd", created_at=ENDED).encode()
    # Signed during a rotation: the SDK accepts the header if any signature matches.
    headers = build_headers("msg_b1", now(), body, [OLD_SECRET, SECRET])
    event = openai_webhooks(SECRET).unwrap(body, headers)
    assert isinstance(event, BATCH_EVENT_MODELS[event_type])
    assert (event.id, event.object, event.type) == ("evt_cd", "event", event_type)
    assert event.created_at == 1796040000 and event.data.id == "batch_2"
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)


def test_the_openai_sdk_refuses_a_tampered_or_foreign_batch_event() -> None:
    body = batch_event("batch.failed", "batch_3", event_id="evt_ef", created_at=ENDED).encode()
    headers = build_headers("msg_b2", now(), body, [SECRET])
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai_webhooks(SECRET).unwrap(body.replace(b"batch_3", b"batch_4"), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai_webhooks(new_secret()).unwrap(body, headers)


# --- a receiver over real HTTP ----------------------------------------------------------


@dataclass
class Seen:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that records every connection and request."""

    def __init__(self, *, redirect_to: str = "", tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Seen] = []
        self.connections = 0
        self.sni: list[str | None] = []
        self.release = threading.Event()
        self.redirect_to = redirect_to
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = False  # so server_close() waits for every handler

            def verify_request(self, request: Any, client_address: Any) -> bool:
                receiver.connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: receiver.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in h.headers.items()}
        try:
            Webhook(SECRET).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        path = h.path.split("?", 1)[0]
        self.requests.append(Seen(h.path, headers, body, verified))
        try:
            if path == "/drip":
                self._drip(h)
                return
            if path == "/slow":
                self.release.wait(5)
            status, extra = self._answer(path)
            h.send_response(status)
            for name, value in extra.items():
                h.send_header(name, value)
            h.send_header("content-length", "0")
            h.end_headers()
        except OSError:
            pass  # the client gave up first, as the timeout tests intend

    def _answer(self, path: str) -> tuple[int, dict[str, str]]:
        soon = email.utils.format_datetime(
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=120), usegmt=True
        )
        return {
            "/ok": (200, {"set-cookie": "session=from-receiver; Path=/"}),
            "/slow": (200, {}),
            "/fail": (500, {}),
            "/redirect": (302, {"location": self.redirect_to}),
            "/gone": (410, {}),
            "/busy": (429, {"retry-after": "7"}),
            "/unavailable": (503, {"retry-after": soon}),
            "/garbled": (503, {"retry-after": "after lunch"}),
            "/forever": (429, {"retry-after": "1e20"}),
        }.get(path, (404, {}))

    def _drip(self, h: BaseHTTPRequestHandler) -> None:
        # Each byte arrives well within any per-read timeout; only a total deadline ends it.
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while not self.release.wait(0.05):
            h.wfile.write(b"x")


@pytest.fixture
def canary() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def receiver(canary: Receiver) -> Iterator[Receiver]:
    server = Receiver(redirect_to=canary.url("/stolen"))
    yield server
    server.close()


def resolver_for(names: dict[str, str]) -> Callable[..., list[Any]]:
    """A getaddrinfo stand-in that sends the given names to the given IPv4 addresses."""

    def getaddrinfo(host: str, port: int, family: int = 0, type: int = 0) -> list[Any]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]

    return getaddrinfo


def post(url: str, *, allow: Sequence[Any] = LOOPBACK, **kwargs: Any) -> DeliveryResult:
    headers = build_headers("msg_http", now(), BODY, [SECRET])
    return deliver(url, BODY, headers, allow=allow, **kwargs)


def test_delivery_to_an_allowlisted_receiver_arrives_signed(receiver: Receiver) -> None:
    result = post(receiver.url("/ok"))
    assert result.ok and result.status_code == 200
    assert result.error is None and not result.blocked and result.retry_after is None
    [seen] = receiver.requests
    assert seen.verified and seen.body == BODY
    assert seen.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert seen.headers["connection"] == "close"


def test_receiver_sees_the_original_host_while_the_socket_goes_to_the_checked_ip(
    receiver: Receiver,
) -> None:
    url = receiver.url("/ok?job=1", host="receiver.test")
    result = post(url, resolver=resolver_for({"receiver.test": "127.0.0.1"}))
    assert result.ok
    [seen] = receiver.requests
    assert seen.headers["host"] == f"receiver.test:{receiver.port}"
    assert seen.path == "/ok?job=1"
    assert seen.verified


def test_redirect_is_a_failure_and_never_followed(receiver: Receiver, canary: Receiver) -> None:
    result = post(receiver.url("/redirect"))
    assert result.status_code == 302 and not result.ok
    assert result.error == "redirect not followed"
    assert canary.connections == 0 and canary.requests == []


@pytest.mark.parametrize(
    "path,status,gone", [("/fail", 500, False), ("/gone", 410, True), ("/nope", 404, False)]
)
def test_error_status_is_returned_as_a_failure(
    receiver: Receiver, path: str, status: int, gone: bool
) -> None:
    result = post(receiver.url(path))
    assert result.status_code == status and not result.ok
    assert result.gone is gone
    assert result.error is not None and str(status) in result.error


def test_retry_after_is_read_as_seconds_or_a_date_capped_and_ignored_when_garbled(
    receiver: Receiver,
) -> None:
    assert post(receiver.url("/busy")).retry_after == 7.0
    wait = post(receiver.url("/unavailable")).retry_after
    assert wait is not None and 100 < wait <= 120
    garbled = post(receiver.url("/garbled"))
    assert garbled.status_code == 503 and garbled.retry_after is None
    assert post(receiver.url("/forever")).retry_after == 86400.0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"])
def test_without_an_allowlist_local_receivers_are_blocked_before_connecting(
    receiver: Receiver, host: str
) -> None:
    result = post(receiver.url("/ok", host=host), allow=())
    assert result.blocked and result.status_code is None and not result.ok
    assert result.error is not None and "loopback" in result.error
    assert receiver.connections == 0 and receiver.requests == []


def test_hostname_resolving_to_loopback_is_blocked(receiver: Receiver) -> None:
    url = receiver.url("/ok", host="innocent.example")
    result = post(url, allow=(), resolver=resolver_for({"innocent.example": "127.0.0.1"}))
    assert result.blocked
    assert receiver.connections == 0


def test_non_http_scheme_is_blocked() -> None:
    result = post("file:///etc/passwd")
    assert result.blocked and result.status_code is None


def test_slow_receiver_times_out_without_raising(receiver: Receiver) -> None:
    started = time.monotonic()
    result = post(receiver.url("/slow"), timeout=0.2)
    assert result.status_code is None and not result.blocked
    assert result.error is not None and result.error.startswith("timed out after 0.2s")
    assert time.monotonic() - started < 1.5


def test_dripping_receiver_is_cut_off_at_the_total_deadline(receiver: Receiver) -> None:
    started = time.monotonic()
    result = post(receiver.url("/drip"), timeout=0.3)
    elapsed = time.monotonic() - started
    assert result.status_code is None
    assert result.error == "timed out after 0.3s (total deadline)"
    assert elapsed < 1.5


def test_refused_connection_and_unknown_host_are_errors_not_exceptions() -> None:
    refused = post(f"http://127.0.0.1:{free_port()}/")
    assert refused.status_code is None and not refused.blocked
    assert refused.error is not None and refused.error.startswith("connection failed")
    unknown = post("http://nowhere.example/", resolver=resolver_for({}))
    assert unknown.status_code is None and not unknown.blocked
    assert unknown.error is not None and "could not resolve" in unknown.error


def test_shared_client_keeps_no_receiver_cookies(receiver: Receiver) -> None:
    with build_client() as client:
        assert post(receiver.url("/ok"), client=client).ok
        assert post(receiver.url("/ok"), client=client).ok
    assert [("cookie" in seen.headers) for seen in receiver.requests] == [False, False]
    assert receiver.connections == 2  # one connection per delivery, none kept alive


# --- TLS: the certificate is checked against the hostname, not the IP ----------------------


def self_signed(directory: Path, name: str) -> tuple[Path, Path, bytes]:
    """A certificate for ``name`` signed by its own key: (cert file, key file, cert PEM)."""
    # cryptography arrives only indirectly (types-redis pulls it in), so skip if it is absent.
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, pem


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, httpx.Client]]:
    cert_file, key_file, pem = self_signed(tmp_path, "receiver.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    server = Receiver(tls=server_ctx)
    client = httpx.Client(verify=ssl.create_default_context(cadata=pem.decode()), trust_env=False)
    yield server, client
    client.close()
    server.close()


def test_tls_verifies_the_hostname_while_connecting_to_the_ip(
    tls_receiver: tuple[Receiver, httpx.Client],
) -> None:
    server, client = tls_receiver
    url = server.url("/ok", host="receiver.test", scheme="https")
    result = post(url, client=client, resolver=resolver_for({"receiver.test": "127.0.0.1"}))
    assert result.ok, result.error
    assert server.sni == ["receiver.test"]
    assert server.requests[0].headers["host"] == f"receiver.test:{server.port}"


def test_tls_to_a_name_the_certificate_does_not_cover_fails(
    tls_receiver: tuple[Receiver, httpx.Client],
) -> None:
    server, client = tls_receiver
    url = server.url("/ok", host="other.test", scheme="https")
    result = post(url, client=client, resolver=resolver_for({"other.test": "127.0.0.1"}))
    assert result.status_code is None
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error
    assert server.requests == []
