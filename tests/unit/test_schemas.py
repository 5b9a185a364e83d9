"""The request schema in isolation: the raw body is what is kept."""

from __future__ import annotations

from chatjobs.schemas import ChatCompletionRequest, JobCreate


def test_raw_body_keeps_integers_and_unknown_keys() -> None:
    body = {
        "messages": [{"role": "user", "content": "x", "name": "n"}],
        "max_tokens": 500,
        "seed": 7,
        "vendor_extension": {"a": [1, 2]},
    }
    request = ChatCompletionRequest.model_validate(body)
    assert request.raw == body
    assert request.raw["max_tokens"] == 500
    assert isinstance(request.raw["max_tokens"], int)


def test_job_create_reads_long_context_default() -> None:
    job = JobCreate.model_validate(
        {"request": {"messages": [{"role": "user", "content": None}]}, "long_context": {}}
    )
    assert job.long_context is not None
    assert job.long_context.strategy == "map_reduce"
