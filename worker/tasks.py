"""Celery tasks: thin wrappers that take ids and call worker.execute."""

from __future__ import annotations

import uuid

from worker import execute, webhook
from worker.celery_app import app


@app.task(name="chatjobs.run_job", ignore_result=True)
def run_job(job_id: str) -> None:
    """Run one attempt of a job (a redelivered message claims nothing and returns)."""
    execute.run_job(uuid.UUID(job_id))


@app.task(name="chatjobs.deliver_webhook", ignore_result=True)
def deliver_webhook(delivery_id: str) -> None:
    """Make one attempt at a webhook delivery."""
    webhook.deliver(uuid.UUID(delivery_id))


@app.task(name="chatjobs.dispatch_due", ignore_result=True)
def dispatch_due() -> int:
    """One dispatcher pass (the dispatcher loops run in beat and workers; this is by hand)."""
    return len(execute.dispatch_due().ids)


@app.task(name="chatjobs.reconcile", ignore_result=True)
def reconcile() -> None:
    """Expire overdue jobs, recover lost leases, republish lost messages."""
    execute.reconcile()


@app.task(name="chatjobs.prune", ignore_result=True)
def prune() -> int:
    """Delete finished jobs past CHATJOBS_RETENTION_DAYS (in bounded batches)."""
    return execute.prune()
