"""The job state machine: the only code that writes or publishes jobs.

- ``submit``: what the API does (create, read, list, cancel; steps are not public);
- ``attempts``: what workers do (claim, renew, defer, plan, record the outcome of a call);
- ``steps``: map-reduce steps as child jobs, and how their parent advances;
- ``sweeps``: the reconciler's repairs and retention;
- ``dispatch``: admitting waiting jobs to the broker in fair order (``fairness``), and
  finding messages the broker lost.

Every status change goes through ``_state`` (``transition``, or a transition prepared once
and ``run`` on the hot path: the same columns and bookkeeping).

Lock discipline, obeyed by the worker, the API and every sweep:

1. A parent's row before any of its steps' rows.
2. Several rows of one kind in ascending id order (``ORDER BY id FOR UPDATE``).
3. Whoever locks several jobs of different families takes them with SKIP LOCKED (the sweeps,
   the heartbeat), so it never waits while holding a row another family's writer needs.
   It waits only on steps of parents it already holds.

A single-row UPDATE (a claim, an outcome of a job without a parent) holds nothing else.
"""

from chatjobs.jobs.attempts import (
    Call,
    Claim,
    Outcome,
    Planned,
    apply_plan,
    claim_job,
    defer_job,
    error_record,
    fail_attempt,
    load_for_plan,
    record_outcome,
    renew_leases,
)
from chatjobs.jobs.dispatch import (
    PRIORITY_BACKFILL,
    PRIORITY_BATCH,
    PRIORITY_SINGLE,
    Admitted,
    admit,
    consumed,
    finished,
    poke,
    publish,
)
from chatjobs.jobs.submit import (
    Created,
    cancel_job,
    count_steps_and_calls,
    create_job,
    get_job,
    get_status,
    list_calls,
    list_jobs,
    list_steps,
    statuses,
)
from chatjobs.jobs.sweeps import Reconciled, count_prunable, prune, prune_batch, reconcile
from chatjobs.upstream import clean_usage

__all__ = [
    "PRIORITY_BACKFILL",
    "PRIORITY_BATCH",
    "PRIORITY_SINGLE",
    "Admitted",
    "Call",
    "Claim",
    "Created",
    "Outcome",
    "Planned",
    "Reconciled",
    "admit",
    "apply_plan",
    "cancel_job",
    "claim_job",
    "clean_usage",
    "consumed",
    "count_prunable",
    "count_steps_and_calls",
    "create_job",
    "defer_job",
    "error_record",
    "fail_attempt",
    "finished",
    "get_job",
    "get_status",
    "list_calls",
    "list_jobs",
    "list_steps",
    "load_for_plan",
    "poke",
    "prune",
    "prune_batch",
    "publish",
    "reconcile",
    "record_outcome",
    "renew_leases",
    "statuses",
]
