"""The pure parts of chatjobs.metrics: labels, bucket arithmetic, the per-process pending
counts, and token counts from odd usage shapes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from chatjobs import metrics
from chatjobs.upstream import Completion
from worker.execute import token_counts


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, "2xx"),
        (201, None, "2xx"),
        (400, None, "4xx"),
        (408, None, "4xx"),
        (429, None, "429"),
        (500, None, "5xx"),
        (503, None, "5xx"),
        (None, "upstream_timeout", "timeout"),
        (None, "upstream_connection_error", "connection"),
        (None, None, "abandoned"),
        (102, None, "2xx"),  # a 1xx never ends a call; it cannot grow a class of its own
        (799, None, "5xx"),
    ],
)
def test_status_class_is_one_of_a_fixed_set(
    status: int | None, error: str | None, expected: str
) -> None:
    assert metrics.status_class(status, error) == expected
    assert expected in metrics.UPSTREAM_CLASSES


def test_job_kind_prefers_step_then_batch_then_schedule() -> None:
    parent = uuid.uuid4()
    assert metrics.job_kind(parent, "batch_x", "sched_x") == "chunk"
    assert metrics.job_kind(None, "batch_x", "sched_x") == "batch_item"
    assert metrics.job_kind(None, None, "sched_x") == "schedule"
    assert metrics.job_kind(None, None, None) == "job"


def test_a_model_nobody_configured_is_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "model_entries", lambda: {"*": object(), "llama": object()})
    monkeypatch.setattr(metrics, "_default", lambda: "gpt-4.1")
    assert metrics.model("gpt-4.1") == "gpt-4.1"
    assert metrics.model("llama") == "llama"
    assert metrics.model("*") == "other"
    assert metrics.model(f"made-up-{uuid.uuid4().hex}") == "other"
    assert metrics.model(None) == "other"
    assert metrics.named_models() == ["gpt-4.1", "llama"]


def test_tenant_is_other_unless_tenants_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_listed", lambda: ())
    tenant_id = uuid.uuid4()
    assert metrics.tenant(tenant_id) == "other"
    monkeypatch.setattr(metrics, "_listed", lambda: ("acme",))
    ref = metrics.tenant(tenant_id)
    assert ref == str(tenant_id) and isinstance(ref, metrics._TenantRef)
    # Resolved when flushed: a listed tenant's name, anyone else "other".
    names = {str(tenant_id): "acme"}
    assert metrics._label(ref, names) == "acme"
    assert metrics._label(metrics.tenant(uuid.uuid4()), names) == "other"
    assert metrics._label("gpt-4.1", names) == "gpt-4.1"
    assert metrics.tenant(None) == "other"


def fresh_recorder(monkeypatch: pytest.MonkeyPatch) -> metrics._Recorder:
    recorder = metrics._Recorder()
    recorder.started = True  # no flushing thread: the test reads what is pending
    monkeypatch.setattr(metrics, "_recorder", recorder)
    return recorder


def test_observations_land_in_the_first_bucket_that_holds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = fresh_recorder(monkeypatch)
    name = "chatjobs_limiter_wait_seconds"
    buckets = metrics.FAMILIES[name].buckets
    for value in (0.0, buckets[0], buckets[0] + 1e-9, buckets[-1], buckets[-1] * 10, -5):
        metrics.observe(name, value, "gpt-4.1")
    pending = recorder.take()
    parts = {part: amount for (_, _, part), amount in pending.items()}
    # 0, the first bound and a negative (clamped to 0) in b0; just above it in b1; the last
    # bound in the last bucket; past it in +Inf.
    assert parts["b0"] == 3 and parts["b1"] == 1
    assert parts[f"b{len(buckets) - 1}"] == 1 and parts[f"b{len(buckets)}"] == 1
    assert parts["sum"] == pytest.approx(buckets[0] * 2 + 1e-9 + buckets[-1] * 11)
    series: dict[tuple[str, ...], dict[str, float]] = {("gpt-4.1",): parts}
    [(labels, cumulative, total)] = list(metrics.histogram_samples(metrics.FAMILIES[name], series))
    assert labels == ("gpt-4.1",)
    assert cumulative[0] == (repr(float(buckets[0])), 3)
    assert cumulative[-1] == ("+Inf", 6)
    assert [count for _, count in cumulative] == sorted(count for _, count in cumulative)
    assert total == parts["sum"]


def test_counters_add_up_and_known_labels_show_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = fresh_recorder(monkeypatch)
    metrics.inc("chatjobs_retries", "429")
    metrics.inc("chatjobs_retries", "429", amount=2)
    metrics.inc("chatjobs_retries", "5xx", amount=0)  # nothing recorded
    pending = recorder.take()
    assert pending == {("chatjobs_retries", ("429",), ""): 3.0}
    family = metrics.FAMILIES["chatjobs_retries"]
    samples = dict(metrics.counter_samples(family, {("429",): {"": 3.0}}))
    assert samples[("429",)] == 3.0
    assert set(samples) == {(r,) for r in metrics.RETRY_REASONS}
    assert all(v == 0 for k, v in samples.items() if k != ("429",))


def test_counts_that_could_not_be_flushed_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = fresh_recorder(monkeypatch)
    metrics.inc("chatjobs_recovered", "lost_lease")

    class Down:
        def pipeline(self, **_: Any) -> Any:
            raise ConnectionError("redis is away")

    monkeypatch.setattr(metrics, "_redis", lambda: Down())
    metrics.flush()
    metrics.inc("chatjobs_recovered", "lost_lease")
    assert recorder.take() == {("chatjobs_recovered", ("lost_lease",), ""): 2.0}


def test_a_forked_child_counts_apart_from_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = fresh_recorder(monkeypatch)
    parent.pid = -1  # as if this process were a child forked after the parent counted
    child = metrics._current()
    assert child is not parent and child.pid != -1


def test_totals_skip_fields_of_unknown_families_and_bad_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = metrics._field("chatjobs_retries", ("429",), "")

    class Stored:
        def hgetall(self, key: str) -> dict[bytes, bytes]:
            return {
                good.encode(): b"4",
                metrics._field("chatjobs_gone", ("x",), "").encode(): b"1",
                metrics._field("chatjobs_retries", ("a", "b"), "").encode(): b"1",
                b"not json": b"1",
            }

    monkeypatch.setattr(metrics, "_redis", lambda: Stored())
    assert metrics.totals() == {"chatjobs_retries": {("429",): {"": 4.0}}}


def completion(body_usage: Any, usage: dict[str, int]) -> Completion:
    return Completion(
        body={"usage": body_usage},
        usage=usage,
        status_code=200,
        request_id=None,
        latency_ms=1,
        ratelimit={},
    )


def test_token_counts_read_cached_and_reasoning_details_and_ignore_odd_shapes() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    full = {
        **usage,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    assert token_counts(completion(full, usage)) == {
        "prompt": 10,
        "completion": 5,
        "cached": 4,
        "reasoning": 3,
    }
    for odd in (
        None,
        "usage",
        {"prompt_tokens_details": "x", "completion_tokens_details": [1]},
        {"prompt_tokens_details": {"cached_tokens": "4"}},
        {"prompt_tokens_details": {"cached_tokens": True}},
        {"prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens_details": {"cached_tokens": 2**40}},
    ):
        assert token_counts(completion(odd, usage)) == {"prompt": 10, "completion": 5}
