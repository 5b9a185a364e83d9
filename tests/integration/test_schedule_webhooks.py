"""Schedule webhook events (schedule.paused): recorded with the pause, sent signed by the real
stack, one delivery per pause."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks
from sqlalchemy import select, update

from chatjobs import deliveries
from chatjobs.db import session_scope
from chatjobs.models import Schedule, WebhookDelivery
from tests.conftest import MiniStack
from tests.integration import test_webhooks_events as job_webhooks
from tests.integration.test_batch_webhooks import attempt_codes, secret_of
from tests.integration.test_reliability import wait_until
from tests.integration.test_webhooks_events import WEBHOOK_ENV, Make, Receiver

pytestmark = pytest.mark.integration
# The job webhook tests' receiver: a real HTTP server on 127.0.0.1 answering per path.
receiver = job_webhooks.receiver
NOTE = "paused after 3 failed firings"


@pytest.fixture
def stack(make_stack: Make, queue: str) -> MiniStack:
    """An api, beat and worker on this test's queue (the schedules' queue), allowed to
    deliver to 127.0.0.1."""
    return make_stack(env={**WEBHOOK_ENV, "CHATJOBS_QUEUE_NAME": queue})


def new_schedule(tenant: uuid.UUID, queue: str, webhook_url: str | None) -> str:
    """A schedule as the engine leaves it when it pauses itself after three failed firings."""
    schedule_id = f"sched_{uuid.uuid4().hex}"
    with session_scope() as session:
        session.add(
            Schedule(
                id=schedule_id,
                tenant_id=tenant,
                queue=queue,
                kind="job",
                template={"request": {"messages": [{"role": "user", "content": "hi"}]}},
                overlap_policy="skip",
                catchup="all",
                catchup_window=3600,
                cron="0 * * * *",
                timezone="UTC",
                webhook_url=webhook_url,
                note=NOTE,
                failures=3,
                pause_after_failures=3,
                paused=True,
            )
        )
    return schedule_id


def pause(schedule_ids: Iterable[str], event_type: str = "schedule.paused") -> None:
    """As the transaction that pauses a schedule does."""
    with session_scope() as session:
        deliveries.queue_schedule_event(session, schedule_ids, event_type)


def deliveries_of(schedule_id: str) -> list[WebhookDelivery]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.schedule_id == schedule_id)
                .order_by(WebhookDelivery.created_at)
            )
        )


def statuses_of(schedule_id: str) -> list[str]:
    return [d.status.value for d in deliveries_of(schedule_id)]


def test_a_paused_schedule_is_delivered_signed_with_its_note_and_failures(
    stack: MiniStack, tenant: uuid.UUID, queue: str, receiver: Receiver
) -> None:
    schedule_id = new_schedule(tenant, queue, f"{receiver.base}/ok")
    pause([schedule_id])
    wait_until(lambda: statuses_of(schedule_id) == ["succeeded"], 15, "the delivery succeeded")
    (hit,) = receiver.on("/ok")
    (delivery,) = deliveries_of(schedule_id)

    payload = standardwebhooks.Webhook(secret_of(tenant)).verify(hit.body, hit.headers)
    assert payload == {
        "id": f"evt_{delivery.id.hex}",
        "object": "event",
        "type": "schedule.paused",
        # The event's time is when it was recorded, in the transaction that paused it.
        "created_at": int(delivery.created_at.timestamp()),
        "data": {"id": schedule_id, "paused": True, "note": NOTE, "failures": 3},
    }
    assert hit.body == json.dumps(payload, separators=(",", ":")).encode()
    assert hit.headers["webhook-id"] == delivery.msg_id
    assert delivery.payload == hit.body.decode()
    assert (delivery.job_id, delivery.batch_id, delivery.queue) == (None, None, queue)
    assert attempt_codes(delivery.id) == [200]
    (worker,) = (p for p in stack.procs if p.name == "worker")
    line = f"delivery={delivery.id} schedule={schedule_id} event=schedule.paused attempt=1"
    wait_until(lambda: line in worker.log_path.read_text(errors="replace"), 10, "logged")


def test_a_schedule_paused_again_gets_a_second_delivery_under_a_new_webhook_id(
    stack: MiniStack, tenant: uuid.UUID, queue: str, receiver: Receiver
) -> None:
    schedule_id = new_schedule(tenant, queue, f"{receiver.base}/again")
    pause([schedule_id])
    wait_until(lambda: statuses_of(schedule_id) == ["succeeded"], 15, "the first delivered")
    pause([schedule_id])
    wait_until(lambda: statuses_of(schedule_id) == ["succeeded"] * 2, 15, "the second delivered")
    first, second = receiver.on("/again")
    assert first.headers["webhook-id"] != second.headers["webhook-id"]
    events = [json.loads(hit.body) for hit in (first, second)]
    assert events[0]["id"] != events[1]["id"]
    assert [e["type"] for e in events] == ["schedule.paused"] * 2
    assert [e["data"]["id"] for e in events] == [schedule_id] * 2


def test_a_500_is_retried_with_the_same_bytes_under_the_same_webhook_id(
    stack: MiniStack, tenant: uuid.UUID, queue: str, receiver: Receiver
) -> None:
    schedule_id = new_schedule(tenant, queue, f"{receiver.base}/flaky")
    pause([schedule_id])
    wait_until(lambda: statuses_of(schedule_id) == ["succeeded"], 20, "delivered after a retry")
    first, second = receiver.on("/flaky")
    (delivery,) = deliveries_of(schedule_id)
    assert first.body == second.body
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.msg_id
    assert attempt_codes(delivery.id) == [500, 200]


def test_a_pause_for_a_url_disabled_by_a_410_is_recorded_gone_and_never_sent(
    stack: MiniStack, tenant: uuid.UUID, queue: str, receiver: Receiver
) -> None:
    url = f"{receiver.base}/gone"
    refused = new_schedule(tenant, queue, url)
    pause([refused])
    wait_until(lambda: statuses_of(refused) == ["gone"], 15, "the 410 made it gone")

    later = new_schedule(tenant, queue, url)
    pause([later])
    (skipped,) = deliveries_of(later)
    time.sleep(1.5)  # time enough to have sent it, were it sent
    assert skipped.status == "gone" and skipped.attempts == 0
    assert skipped.next_attempt_at is None
    assert skipped.last_error is not None and "disabled" in skipped.last_error
    assert statuses_of(later) == ["gone"] and attempt_codes(skipped.id) == []
    assert len(receiver.on("/gone")) == 1


def test_each_pause_is_its_own_delivery_and_a_schedule_without_a_url_gets_none(
    tenant: uuid.UUID, queue: str
) -> None:
    silent = new_schedule(tenant, queue, None)
    heard = new_schedule(tenant, queue, "https://example.com/hook")
    pause([silent, heard])
    pause([heard])
    assert deliveries_of(silent) == []
    first, second = deliveries_of(heard)
    assert first.msg_id != second.msg_id
    for delivery in (first, second):
        assert delivery.event_type == "schedule.paused" and delivery.status == "pending"
        assert delivery.url == "https://example.com/hook" and delivery.queue == queue


def test_an_unknown_schedule_event_is_refused(tenant: uuid.UUID, queue: str) -> None:
    schedule_id = new_schedule(tenant, queue, "https://example.com/hook")
    with pytest.raises(ValueError, match=r"schedule\.fired"):
        pause([schedule_id], "schedule.fired")
    assert deliveries_of(schedule_id) == []


def test_a_schedule_delivery_whose_worker_died_is_made_due_again(
    tenant: uuid.UUID, queue: str
) -> None:
    # The reconciler's sweep, in-process: the attempt's lease ran out with no result.
    schedule_id = new_schedule(tenant, queue, "https://example.com/hook")
    pause([schedule_id])
    (delivery,) = deliveries_of(schedule_id)
    with session_scope() as session:
        assert deliveries.take_due(session) == [delivery.id]
        claimed = deliveries.claim(session, delivery.id)
        assert claimed is not None
        assert (claimed.job_id, claimed.batch_id, claimed.schedule_id) == (None, None, schedule_id)
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery.id)
            .values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with session_scope() as session:
        assert deliveries.reconcile(session) == 1
        assert deliveries.take_due(session) == [delivery.id]
