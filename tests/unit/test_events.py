"""Event publishing never waits on Redis, keeps its order, and drops the oldest when full."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from chatjobs import events
from chatjobs.settings import get_settings
from tests.conftest import REDIS


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers, like a stuck Redis."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def redis_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Point CHATJOBS_REDIS_URL somewhere and give this process a fresh publisher."""

    def point(url: str) -> None:
        monkeypatch.setenv("CHATJOBS_REDIS_URL", url)
        get_settings.cache_clear()
        monkeypatch.setattr(events, "_publisher", None)

    yield point
    get_settings.cache_clear()


def _publish_seconds(rounds: int, per_round: int, pause: float) -> list[float]:
    took = []
    for _ in range(rounds):
        for i in range(per_round):
            started = time.perf_counter()
            events.publish(uuid.uuid4(), "delta", {"delta": {"content": f"chunk {i}"}})
            took.append(time.perf_counter() - started)
        time.sleep(pause)
    return sorted(took)


def _assert_never_waits(took: list[float]) -> None:
    # A publish that waited on Redis would take the client's 2 s timeout; the slack above
    # milliseconds is for a busy machine descheduling this thread.
    assert took[len(took) // 2] < 0.001, f"median {took[len(took) // 2] * 1000:.2f} ms"
    assert took[-1] < 0.5, f"one publish took {took[-1] * 1000:.0f} ms"


def test_publish_returns_at_once_when_redis_never_answers(
    silent_server: str, redis_at: object
) -> None:
    redis_at(silent_server)  # type: ignore[operator]
    started = time.perf_counter()
    # Spread over a second, while the sender is stuck waiting for an answer (2 s timeout).
    _assert_never_waits(_publish_seconds(rounds=4, per_round=250, pause=0.25))
    assert time.perf_counter() - started < 2


def test_publish_returns_at_once_when_redis_is_unreachable(redis_at: object) -> None:
    # 192.0.2.0/24 is TEST-NET-1, never routed: a connect hangs until its timeout, or is
    # refused at once, depending on the network.
    redis_at("redis://192.0.2.1:6379/0")  # type: ignore[operator]
    _assert_never_waits(_publish_seconds(rounds=4, per_round=250, pause=0.25))


@dataclass
class GatedRedis:
    """Just enough of Redis to answer PUBLISH, and only while the gate is open."""

    gate: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    published: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    def serve(self, server: socket.socket) -> None:
        conn, _ = server.accept()
        reader = conn.makefile("rb")
        while True:
            command = _read_command(reader)
            if command is None:
                return
            if command[0].upper() != "PUBLISH":  # the client's handshake on connect
                conn.sendall(b"+OK\r\n")
                continue
            self.arrived.set()
            self.gate.wait()
            self.published.append((command[1], command[2]))
            conn.sendall(b":0\r\n")


def _read_command(reader: object) -> list[str] | None:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line:
        return None
    assert line.startswith(b"*"), line
    parts = []
    for _ in range(int(line[1:])):
        size = int(reader.readline()[1:])  # type: ignore[attr-defined]
        parts.append(reader.read(size + 2)[:-2].decode())  # type: ignore[attr-defined]
    return parts


@pytest.fixture
def gated() -> Iterator[GatedRedis]:
    fake = GatedRedis()
    server = socket.create_server(("127.0.0.1", 0))
    fake.port = server.getsockname()[1]
    threading.Thread(target=fake.serve, args=(server,), daemon=True).start()
    yield fake
    fake.gate.set()
    server.close()


def test_a_full_queue_drops_the_oldest_events_and_counts_them(gated: GatedRedis) -> None:
    publisher = events.Publisher(
        redis.Redis(port=gated.port, socket_timeout=5, protocol=2), capacity=10
    )
    publisher.put("c", "0")
    assert gated.arrived.wait(5)  # the sender took "0" and waits for the gated server
    for i in range(1, 100):
        publisher.put("c", str(i))
    gated.gate.set()
    assert publisher.flush(timeout=5)
    assert [m for _, m in gated.published] == ["0", *(str(i) for i in range(90, 100))]
    assert publisher.dropped == 89
    assert publisher.sent == 11


# --- against a real Redis ----------------------------------------------------------------


def _subscribe(name: str) -> redis.client.PubSub:
    pubsub = redis.Redis.from_url(REDIS).pubsub()
    pubsub.subscribe(name)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    return pubsub


def _receive(pubsub: redis.client.PubSub, count: int, timeout: float = 10) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            got.append(json.loads(message["data"]))
    return got


@pytest.mark.integration
def test_a_subscriber_receives_every_event_in_order(redis_at: object) -> None:
    redis_at(REDIS)  # type: ignore[operator]
    job_id = uuid.uuid4()
    pubsub = _subscribe(events.channel(job_id))
    try:
        for i in range(2000):
            events.publish(job_id, "delta", {"delta": {"content": str(i)}})
        events.publish(job_id, "status", {"status": "succeeded"})
        got = _receive(pubsub, 2001)
    finally:
        pubsub.close()
    assert [g["delta"]["content"] for g in got[:-1]] == [str(i) for i in range(2000)]
    assert got[-1] == {"kind": "status", "status": "succeeded"}


@pytest.mark.integration
def test_a_forked_child_publishes_through_its_own_sender(redis_at: object) -> None:
    redis_at(REDIS)  # type: ignore[operator]
    job_id = uuid.uuid4()
    pubsub = _subscribe(events.channel(job_id))
    try:
        events.publish(job_id, "status", {"status": "parent"})  # the parent's sender runs
        assert _receive(pubsub, 1) == [{"kind": "status", "status": "parent"}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, as Celery
            pid = os.fork()
        if pid == 0:  # the child: a Celery prefork pool process
            code = 1
            try:
                events.publish(job_id, "status", {"status": "child"})
                code = 0 if events.publisher().flush(timeout=5) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _receive(pubsub, 1) == [{"kind": "status", "status": "child"}]
    finally:
        pubsub.close()


@pytest.mark.integration
def test_the_hub_fans_one_subscription_out_and_drops_it_when_the_last_stream_ends(
    redis_at: object,
) -> None:
    redis_at(REDIS)  # type: ignore[operator]
    name = events.channel(uuid.uuid4())
    admin = redis.Redis.from_url(REDIS)

    def subscribers() -> int:
        return int(dict(admin.pubsub_numsub(name))[name.encode()])

    async def scenario() -> None:
        hub = events.hub()
        try:
            async with hub.listen(name) as first, hub.listen(name) as second:
                assert subscribers() == 1  # one connection for both streams
                admin.publish(name, json.dumps({"kind": "delta", "n": 1}))
                assert await asyncio.wait_for(first.get(), 5) == {"kind": "delta", "n": 1}
                assert await asyncio.wait_for(second.get(), 5) == {"kind": "delta", "n": 1}
            for _ in range(50):
                if subscribers() == 0:
                    break
                await asyncio.sleep(0.1)
            assert subscribers() == 0
        finally:
            await hub.aclose()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()
