"""The pure parts of offloading (chatjobs.offload): the OpenAI batch lines both ways, the
models file's offload fields, the route a batch API is reached by, and the saving."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from chatjobs.errors import UpstreamStatusError, is_retryable
from chatjobs.limiter import Limits
from chatjobs.offload import available, batch_upstream
from chatjobs.offload.openai_batch import OpenAIBatch, line_result
from chatjobs.offload.upstream import EarlierSubmit, Item
from chatjobs.routing import ModelsFileError, Route, load_models_file


def earlier(ref: str, since: datetime) -> EarlierSubmit:
    return EarlierSubmit(ref=ref, since=since, items=1, job_ids=frozenset(), taken=frozenset())


def test_a_line_carries_the_job_id_and_the_request_never_streamed() -> None:
    request = {"model": "gpt-4.1", "messages": [], "stream": True, "stream_options": {}}
    line = json.loads(OpenAIBatch().encode(Item("job-1", request)))
    assert line["custom_id"] == "job-1" and line["url"] == "/v1/chat/completions"
    assert line["method"] == "POST" and line["body"]["model"] == "gpt-4.1"
    assert "stream" not in line["body"] and "stream_options" not in line["body"]


def test_output_lines_map_back_by_custom_id_with_the_synchronous_classification() -> None:
    completion = {"id": "c1", "choices": [{"message": {}}], "usage": {"total_tokens": 3}}
    ok = line_result({"custom_id": "a", "response": {"status_code": 200, "body": completion}})
    assert ok is not None and ok.completion == completion and ok.error is None

    def error(status: int, code: str) -> UpstreamStatusError:
        body = {"error": {"message": "no", "code": code}}
        result = line_result({"custom_id": "b", "response": {"status_code": status, "body": body}})
        assert result is not None and isinstance(result.error, UpstreamStatusError)
        assert result.error.status_code == status and result.error.code == code
        return result.error

    assert is_retryable(error(500, "server_error"))
    assert is_retryable(error(429, "rate_limit_exceeded"))
    assert not is_retryable(error(400, "invalid_request_error"))
    assert not is_retryable(error(429, "insufficient_quota"))
    expired = line_result({"custom_id": "c", "error": {"code": "batch_expired", "message": "x"}})
    assert expired is not None and expired.unfinished
    assert line_result({"response": {"status_code": 200}}) is None
    empty = line_result({"custom_id": "d", "response": {"status_code": 200, "body": {}}})
    assert empty is not None and empty.error is not None and is_retryable(empty.error)


def test_find_pages_back_until_the_row_is_older_than_the_listing() -> None:
    pages = {
        None: {"data": [{"id": "b3", "created_at": 300, "metadata": {}}], "has_more": True},
        "b3": {
            "data": [{"id": "b2", "created_at": 200, "metadata": {"chatjobs_ref": "r"}}],
            "has_more": True,
        },
    }
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("after")
        seen.append(after)
        return httpx.Response(200, json=pages.get(after, {"data": [], "has_more": False}))

    route = Route(model="m", base_url="http://up/v1", api_key_env=None, limits=Limits(1, 1, 1))
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        since = datetime.fromtimestamp(100, UTC)
        assert OpenAIBatch().find(client, route, earlier("r", since)) == "b2"
        assert OpenAIBatch().find(client, route, earlier("other", since)) is None
    assert seen == [None, "b3", None, "b3", "b2"]


def test_the_models_file_names_an_unknown_offload_value(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models."m"]\noffload = "azure-batch"\n')
    with pytest.raises(ModelsFileError, match=r"models\.m\.offload"):
        load_models_file(path)
    path.write_text('[models."*"]\noffload = "openai-batch"\n')
    with pytest.raises(ModelsFileError, match=r"models\.\*\.offload"):
        load_models_file(path)
    path.write_text('[models."m"]\noffload = "openai-batch"\noffload_min_deadline = 0\n')
    with pytest.raises(ModelsFileError, match="offload_min_deadline"):
        load_models_file(path)
    path.write_text('[models."m"]\noffload = "off"\n')
    assert load_models_file(path)["m"].offload == "off"
    path.write_text('[models."m"]\noffload = "anthropic-batch"\n')
    assert load_models_file(path)["m"].offload == "anthropic-batch"


def test_the_registry_imports_only_what_is_installed() -> None:
    assert sorted(available()) == ["anthropic-batch", "openai-batch"]
    assert batch_upstream("openai-batch").name == "openai-batch"
    assert batch_upstream("anthropic-batch").name == "anthropic-batch"


def test_a_batch_route_is_the_route_with_the_offload_address_and_key() -> None:
    route = Route(
        model="m",
        base_url="http://sync/v1",
        api_key_env="SYNC",
        limits=Limits(1, 1, 1),
        offload="openai-batch",
        offload_base_url="http://batch/v1",
        offload_api_key_env="BATCH",
    )
    batch = route.batch_route()
    assert (batch.base_url, batch.api_key_env) == ("http://batch/v1", "BATCH")
    plain = Route(model="m", base_url="http://sync/v1", api_key_env="SYNC", limits=Limits(1, 1, 1))
    assert plain.batch_route() is plain
