"""The Celery app's configuration, and the one way anything puts a job on the broker.

The API publishes through here without importing worker/; the worker builds its app from the
same configuration and registers the tasks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterable
from functools import lru_cache

from celery import Celery
from kombu import Queue

from chatjobs.settings import Settings, get_settings

log = logging.getLogger(__name__)

RUN_JOB = "chatjobs.run_job"
DELIVER = "chatjobs.deliver_webhook"


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app wired to the broker with the delivery guarantees chatjobs relies on."""
    settings = settings or get_settings()
    app = Celery("chatjobs", broker=settings.redis_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        # A plain `celery -A worker worker` consumes every queue listed here.
        task_queues=[
            Queue(settings.queue_name),
            Queue(express_queue(settings)),
            Queue(control_queue(settings)),
            Queue(webhook_queue(settings)),
        ],
        # Periodic ticks (dispatch, reconcile) ride a queue of their own so that a backlog
        # of job messages cannot delay them; the worker consumes both.
        task_routes={
            "chatjobs.dispatch_due": {"queue": control_queue(settings)},
            "chatjobs.reconcile": {"queue": control_queue(settings)},
            "chatjobs.prune": {"queue": control_queue(settings)},
        },
        # Publishing must fail fast when Redis is down: the row is already durable and the
        # reconciler republishes it, so a request should not hang on the broker.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        broker_connection_timeout=2,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acknowledged only once its task returns, and handed back if the
        # worker process dies: the conditional claim makes the redelivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacknowledged message after this long. Recovery does not wait
        # on it (the reconciler re-enqueues from Postgres); it only bounds how long a message
        # of a dead worker lingers.
        broker_transport_options={"visibility_timeout": 3600},
        # On SIGTERM, let running calls finish for this long before the cold shutdown hands
        # their messages back; a call cut short is recovered by its lease anyway.
        worker_soft_shutdown_timeout=settings.worker_shutdown_seconds,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def express_queue(settings: Settings) -> str:
    """Jobs admitted above the priority of those already waiting in the broker ride here,
    so they do not wait behind the broker's window of lower-priority messages. A worker
    consumes its queues round robin, moving the one it last took from to the back, so a
    message here is taken at the next free slot."""
    return f"{settings.queue_name}-express"


def control_queue(settings: Settings) -> str:
    return f"{settings.queue_name}-control"


def webhook_queue(settings: Settings) -> str:
    return f"{settings.queue_name}-webhooks"


@lru_cache
def get_producer() -> Celery:
    return make_celery()


def enqueue_jobs(job_ids: Iterable[uuid.UUID], *, express: Collection[uuid.UUID] = ()) -> None:
    """Publish one wake-up per job, the ``express`` ones on the express queue (ahead of the
    window), through one producer. Call only after the rows have committed."""
    app = get_producer()
    settings = get_settings()
    queues = {False: settings.queue_name, True: express_queue(settings)}
    with app.producer_or_acquire() as producer:
        for job_id in job_ids:
            queue = queues[job_id in express]
            app.send_task(RUN_JOB, args=[str(job_id)], queue=queue, producer=producer)


def enqueue_deliveries(delivery_ids: Iterable[uuid.UUID]) -> None:
    """Publish one wake-up per webhook delivery. Call only after the rows have committed."""
    app = get_producer()
    queue = webhook_queue(get_settings())
    with app.producer_or_acquire() as producer:
        for delivery_id in delivery_ids:
            app.send_task(DELIVER, args=[str(delivery_id)], queue=queue, producer=producer)
