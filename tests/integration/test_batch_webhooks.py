"""Batch webhook events: OpenAI's event shape, sent by the real stack, verified by the SDK."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import openai
import pytest
import standardwebhooks
from sqlalchemy import select, update

from chatjobs import deliveries
from chatjobs.db import session_scope
from chatjobs.models import Batch, WebhookDelivery
from tests.conftest import MiniStack
from tests.integration import test_webhooks_events as job_webhooks
from tests.integration.test_reliability import wait_until
from tests.integration.test_webhooks_events import WEBHOOK_ENV, Make, Receiver

pytestmark = pytest.mark.integration
# The job webhook tests' receiver: a real HTTP server on 127.0.0.1 answering per path.
receiver = job_webhooks.receiver


@pytest.fixture
def stack(make_stack: Make, queue: str) -> MiniStack:
    """An api, beat and worker on this test's queue (the one its events are recorded on),
    allowed to deliver to 127.0.0.1."""
    return make_stack(env={**WEBHOOK_ENV, "CHATJOBS_QUEUE_NAME": queue})


def new_batch(tenant: uuid.UUID, webhook_url: str | None) -> str:
    batch_id = f"batch_{uuid.uuid4().hex}"
    with session_scope() as session:
        session.add(
            Batch(
                id=batch_id,
                tenant_id=tenant,
                status="completed",
                endpoint="/v1/chat/completions",
                input_file_id=f"file-{uuid.uuid4().hex}",
                completion_window="24h",
                window_seconds=86400,
                expires_at=datetime.now(UTC) + timedelta(days=1),
                webhook_url=webhook_url,
            )
        )
    return batch_id


def end(batch_ids: Iterable[str], event_type: str = "batch.completed") -> None:
    """As the transaction that ends a batch does."""
    with session_scope() as session:
        deliveries.queue_batch_event(session, batch_ids, event_type)


def deliveries_of(batch_id: str) -> list[WebhookDelivery]:
    with session_scope() as session:
        return list(
            session.scalars(select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id))
        )


def status_of(batch_id: str) -> str | None:
    found = deliveries_of(batch_id)
    return found[0].status.value if found else None


def attempt_codes(delivery_id: uuid.UUID) -> list[int | None]:
    with session_scope() as session:
        return [a.status_code for a in deliveries.attempts_for(session, [delivery_id])]


def secret_of(tenant: uuid.UUID) -> str:
    with session_scope() as session:
        (secret,) = deliveries.active_secrets(session, tenant)
        return secret.secret


def test_a_completed_batch_is_delivered_as_openais_event_and_the_sdk_unwraps_it(
    stack: MiniStack, tenant: uuid.UUID, receiver: Receiver
) -> None:
    batch_id = new_batch(tenant, f"{receiver.base}/ok")
    end([batch_id])
    wait_until(lambda: status_of(batch_id) == "succeeded", 15, "the delivery succeeded")
    (hit,) = receiver.on("/ok")
    secret = secret_of(tenant)

    event = openai.OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(hit.body, hit.headers)
    assert event.type == "batch.completed" and event.data.id == batch_id
    assert event.object == "event" and event.id.startswith("evt_")
    payload = standardwebhooks.Webhook(secret).verify(hit.body, hit.headers)
    assert payload == {
        "id": event.id,
        "object": "event",
        "type": "batch.completed",
        "created_at": event.created_at,
        "data": {"id": batch_id},
    }
    assert hit.body == json.dumps(payload, separators=(",", ":")).encode()

    (delivery,) = deliveries_of(batch_id)
    assert delivery.job_id is None and delivery.msg_id == hit.headers["webhook-id"]
    # The event's time is when it was recorded, in the transaction that ended the batch.
    assert event.created_at == int(delivery.created_at.timestamp())
    assert delivery.payload == hit.body.decode()
    assert attempt_codes(delivery.id) == [200]
    (worker,) = (p for p in stack.procs if p.name == "worker")
    line = f"delivery={delivery.id} batch={batch_id} event=batch.completed attempt=1"
    wait_until(lambda: line in worker.log_path.read_text(errors="replace"), 10, "logged")


def test_a_500_is_retried_with_the_same_bytes_under_the_same_webhook_id(
    stack: MiniStack, tenant: uuid.UUID, receiver: Receiver
) -> None:
    batch_id = new_batch(tenant, f"{receiver.base}/flaky")
    end([batch_id], "batch.failed")
    wait_until(lambda: status_of(batch_id) == "succeeded", 20, "delivered after a retry")
    first, second = receiver.on("/flaky")
    (delivery,) = deliveries_of(batch_id)
    assert first.body == second.body
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.msg_id
    assert attempt_codes(delivery.id) == [500, 200]
    event = openai.OpenAI(api_key="x", webhook_secret=secret_of(tenant)).webhooks.unwrap(
        second.body, second.headers
    )
    assert event.type == "batch.failed" and event.data.id == batch_id


def test_an_event_for_a_url_disabled_by_a_410_is_recorded_gone_and_never_sent(
    stack: MiniStack, tenant: uuid.UUID, receiver: Receiver
) -> None:
    url = f"{receiver.base}/gone"
    refused = new_batch(tenant, url)
    end([refused], "batch.expired")
    wait_until(lambda: status_of(refused) == "gone", 15, "the 410 made it gone")

    later = new_batch(tenant, url)
    end([later], "batch.cancelled")
    (skipped,) = deliveries_of(later)
    time.sleep(1.5)  # time enough to have sent it, were it sent
    (first,) = deliveries_of(refused)
    assert attempt_codes(first.id) == [410]
    assert skipped.status == "gone" and skipped.attempts == 0
    assert skipped.next_attempt_at is None
    assert skipped.last_error is not None and "disabled" in skipped.last_error
    assert status_of(later) == "gone" and attempt_codes(skipped.id) == []
    assert len(receiver.on("/gone")) == 1


def test_the_same_batch_event_queued_twice_is_one_delivery(tenant: uuid.UUID) -> None:
    batch_id = new_batch(tenant, "https://example.com/hook")
    end([batch_id, batch_id])
    end([batch_id])
    (delivery,) = deliveries_of(batch_id)
    assert delivery.event_type == "batch.completed" and delivery.status == "pending"
    assert delivery.job_id is None and delivery.url == "https://example.com/hook"


def test_a_batch_without_a_webhook_url_gets_no_delivery(tenant: uuid.UUID) -> None:
    silent = new_batch(tenant, None)
    heard = new_batch(tenant, "https://example.com/hook")
    end([silent, heard])
    assert deliveries_of(silent) == []
    assert len(deliveries_of(heard)) == 1


def test_an_event_type_openai_does_not_send_is_refused(tenant: uuid.UUID) -> None:
    batch_id = new_batch(tenant, "https://example.com/hook")
    with pytest.raises(ValueError, match=r"batch\.finished"):
        end([batch_id], "batch.finished")
    assert deliveries_of(batch_id) == []


def test_a_batch_delivery_whose_worker_died_is_made_due_again(tenant: uuid.UUID) -> None:
    # The reconciler's sweep, in-process: the attempt's lease ran out with no result.
    batch_id = new_batch(tenant, "https://example.com/hook")
    end([batch_id])
    (delivery,) = deliveries_of(batch_id)
    with session_scope() as session:
        assert deliveries.take_due(session) == [delivery.id]
        claimed = deliveries.claim(session, delivery.id)
        assert claimed is not None
        assert (claimed.job_id, claimed.batch_id) == (None, batch_id)
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery.id)
            .values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with session_scope() as session:
        assert deliveries.reconcile(session) == 1
        assert deliveries.take_due(session) == [delivery.id]
