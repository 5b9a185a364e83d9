"""Hostile input against the real API: every answer is a 4xx in the error envelope naming the
field, or a 202 whose job reads back; never a 5xx, never a stored row that breaks on read.

The table holds each input of issue 10 and more of the same kinds; a Hypothesis fuzz test
inserts arbitrary JSON values (NaN, huge integers, deep nesting, NUL, lone surrogates, long
strings) at every place the schema passes values through.
"""

from __future__ import annotations

import json
import math
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def request(**extra: Any) -> dict[str, Any]:
    return {"request": {"messages": MESSAGES, **extra}}


def post(client: httpx.Client, body: dict[str, Any] | str, **headers: str) -> httpx.Response:
    """POST /v1/jobs with the body as JSON text: Python's json writes NaN, Infinity and lone
    surrogates (as \\ud800 escapes) the way a hostile client would."""
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json", **headers}
    for _ in range(50):
        response = client.post("/v1/jobs", content=content.encode(), headers=headers)
        if response.status_code != 429:  # the tenant's submission rate: wait as told
            return response
        time.sleep(float(response.headers.get("retry-after-ms", "100")) / 1000)
    return response


def assert_envelope(response: httpx.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str), error
    assert response.headers.get("x-request-id")
    return dict(error)


def assert_readable(client: httpx.Client, job_id: str) -> dict[str, Any]:
    one = client.get(f"/v1/jobs/{job_id}")
    assert one.status_code == 200, one.text
    listed = client.get("/v1/jobs", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    assert job_id in [j["id"] for j in listed.json()["data"]]
    return dict(one.json())


@dataclass(frozen=True)
class Refused:
    status: int
    param: str | None = None
    rule: str | None = None
    type: str = "invalid_request_error"


ACCEPTED = None  # a 202 whose job reads back

SOON = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
DEEP_JSON = "[" * 100_000 + "]" * 100_000

CASES: dict[str, tuple[dict[str, Any] | str, Refused | None]] = {
    # NUL and lone surrogates in any string: content, metadata keys and values, model,
    # pass-through keys, webhook_url, long_context prompts.
    "nul-in-content": (
        {"request": {"messages": [{"role": "user", "content": "a\x00b"}]}},
        Refused(422, "request.messages[0].content", "nul_character"),
    ),
    "nul-in-content-part": (
        {
            "request": {
                "messages": [{"role": "user", "content": [{"type": "text", "text": "\x00"}]}]
            }
        },
        Refused(422, "request.messages[0].content[0].text", "nul_character"),
    ),
    "nul-in-message-name": (
        {"request": {"messages": [{"role": "user", "content": "x", "name": "\x00"}]}},
        Refused(422, "request.messages[0].name", "nul_character"),
    ),
    "nul-in-metadata-value": (
        {**request(), "metadata": {"k": "v\x00"}},
        Refused(422, "metadata.k", "nul_character"),
    ),
    "nul-in-metadata-key": (
        {**request(), "metadata": {"k\x00": "v"}},
        Refused(422, "metadata.k\ufffd", "nul_character"),
    ),
    "nul-in-model": (request(model="gpt-4.1\x00"), Refused(422, "request.model", "nul_character")),
    "nul-in-pass-through": (
        request(vendor={"a": ["\x00"]}),
        Refused(422, "request.vendor.a[0]", "nul_character"),
    ),
    "nul-in-pass-through-key": (
        request(**{"ven\x00dor": 1}),
        Refused(422, "request.ven\ufffddor", "nul_character"),
    ),
    "nul-in-webhook-url": (
        {**request(), "webhook_url": "https://example.com/\x00"},
        Refused(422, "webhook_url", "nul_character"),
    ),
    "nul-in-map-prompt": (
        {**request(), "long_context": {"map_prompt": "part {index}\x00"}},
        Refused(422, "long_context.map_prompt", "nul_character"),
    ),
    "nul-in-tool-arguments": (
        request(
            messages=[
                *MESSAGES,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "\x00"},
                        }
                    ],
                },
            ]
        ),
        Refused(422, "request.messages[1].tool_calls[0].function.arguments", "nul_character"),
    ),
    "surrogate-in-content": (
        {"request": {"messages": [{"role": "user", "content": "\ud800"}]}},
        Refused(422, "request.messages[0].content", "lone_surrogate"),
    ),
    "low-surrogate-in-metadata": (
        {**request(), "metadata": {"k": ["ok", "x\udfffy"]}},
        Refused(422, "metadata.k[1]", "lone_surrogate"),
    ),
    "surrogate-in-metadata-key": (
        {**request(), "metadata": {"\ud800": 1}},
        Refused(422, "metadata.\ufffd", "lone_surrogate"),
    ),
    "surrogate-in-model": (
        request(model="\udc00"),
        Refused(422, "request.model", "lone_surrogate"),
    ),
    "surrogate-in-response-format-schema": (
        request(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": {"description": "\ud83d"}},
            }
        ),
        Refused(422, "request.response_format.json_schema.schema.description", "lone_surrogate"),
    ),
    "surrogate-in-reduce-prompt": (
        {**request(), "long_context": {"reduce_prompt": "\ud800"}},
        Refused(422, "long_context.reduce_prompt", "lone_surrogate"),
    ),
    "a-surrogate-pair-is-one-character": (
        {"request": {"messages": [{"role": "user", "content": "\ud83d\ude00"}]}},
        ACCEPTED,
    ),
    "nul-escaped-as-text-is-fine": (
        {"request": {"messages": [{"role": "user", "content": "\\u0000"}]}},
        ACCEPTED,
    ),
    # Non-finite numbers anywhere (Python's json reads NaN, Infinity and 1e400).
    "nan-in-metadata": (
        {**request(), "metadata": {"x": math.nan}},
        Refused(422, "metadata.x", "non_finite_number"),
    ),
    "infinity-in-pass-through": (
        request(vendor=[1, math.inf]),
        Refused(422, "request.vendor[1]", "non_finite_number"),
    ),
    "minus-infinity-in-tools": (
        request(tools=[{"type": "function", "function": {"name": "f", "parameters": -math.inf}}]),
        Refused(422, "request.tools[0].function.parameters", "non_finite_number"),
    ),
    "infinite-max-tokens": (
        request(max_tokens=math.inf),
        Refused(422, "request.max_tokens", "non_finite_number"),
    ),
    "nan-max-completion-tokens": (
        request(max_completion_tokens=math.nan),
        Refused(422, "request.max_completion_tokens", "non_finite_number"),
    ),
    "nan-temperature": (
        request(temperature=math.nan),
        Refused(422, "request.temperature", "non_finite_number"),
    ),
    "1e400-is-infinity": (
        '{"request": {"messages": [{"role": "user", "content": "x"}], "seed": 1e400}}',
        Refused(422, "request.seed", "non_finite_number"),
    ),
    "nan-in-tool-choice": (
        request(tool_choice={"x": math.nan}),
        Refused(422, "request.tool_choice.x", "non_finite_number"),
    ),
    # Huge numbers that are finite are stored as they are.
    "integer-of-4000-digits-in-metadata": (
        '{"request": {"messages": [{"role": "user", "content": "x"}]}, "metadata": {"n": 1'
        + "0" * 3999
        + "}}",
        ACCEPTED,
    ),
    "integer-of-5000-digits": (
        '{"request": {"messages": [{"role": "user", "content": "x"}], "seed": 1'
        + "0" * 4999
        + "}}",
        Refused(400, type="http_error"),
    ),
    "max-tokens-1e308": (request(max_tokens=1e308), Refused(422, type="context_length_exceeded")),
    "max-tokens-10-to-the-400": (
        '{"request": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1'
        + "0" * 400
        + "}}",
        Refused(422, "request.max_tokens", "float_type"),
    ),
    "max-tokens-a-fraction": (request(max_tokens=0.5), ACCEPTED),
    "priority-1e10": (
        {**request(), "priority": 10**10},
        Refused(422, "priority", "less_than_equal"),
    ),
    # Nesting deeper than 64 levels anywhere.
    "300-deep-pass-through": (
        request(vendor=nested(300)),
        Refused(422, "request.vendor" + "[0]" * 63, "json_too_deep"),
    ),
    "65-deep-metadata": (
        {**request(), "metadata": {"k": nested(64)}},
        Refused(422, "metadata.k" + "[0]" * 63, "json_too_deep"),
    ),
    "64-deep-metadata": ({**request(), "metadata": {"k": nested(63)}}, ACCEPTED),
    "64-deep-request": (request(vendor=nested(63)), ACCEPTED),
    "deep-response-format-schema": (
        request(response_format={"type": "json_schema", "json_schema": {"schema": nested(70)}}),
        Refused(422, "request.response_format.json_schema.schema" + "[0]" * 61, "json_too_deep"),
    ),
    "100000-deep-body": (
        '{"request": {"messages": [], "x": ' + DEEP_JSON + "}}",
        Refused(400, type="http_error"),
    ),
    # Strings over the column sizes.
    "model-of-201-characters": (
        request(model="m" * 201),
        Refused(422, "request.model", "string_too_long"),
    ),
    "model-of-200-characters": (request(model="m" * 200), ACCEPTED),
    "webhook-url-of-2049-characters": (
        {**request(), "webhook_url": "https://example.com/" + "a" * 2029},
        Refused(422, "webhook_url", "string_too_long"),
    ),
    "map-prompt-of-4001-characters": (
        {**request(), "long_context": {"map_prompt": "p" * 4001}},
        Refused(422, "long_context.map_prompt", "string_too_long"),
    ),
    # Dates outside the documented range (at most 365 days ahead).
    "deadline-9999-behind-utc": (
        {**request(), "deadline": "9999-12-31T23:59:59-23:59"},
        Refused(422, "deadline", "value_error"),
    ),
    "deadline-year-1-ahead-of-utc": (
        {**request(), "deadline": "0001-01-01T00:00:00+23:59"},
        Refused(422, "deadline", "value_error"),
    ),
    "deadline-two-years-ahead": (
        {**request(), "deadline": (datetime.now(UTC) + timedelta(days=730)).isoformat()},
        Refused(422, "deadline", "value_error"),
    ),
    "deadline-as-a-huge-number": ({**request(), "deadline": 1e20}, Refused(422, "deadline")),
    "deadline-in-an-hour": ({**request(), "deadline": SOON}, ACCEPTED),
    # Shapes.
    "metadata-an-array": ({**request(), "metadata": [1, 2]}, Refused(422, "metadata", "dict_type")),
    "body-an-array": ("[]", Refused(422)),
    "body-not-json": ("{", Refused(422, rule="json_invalid")),
    "noncharacters-are-text": (
        {"request": {"messages": [{"role": "user", "content": "\ufffe\uffff\U0010ffff"}]}},
        ACCEPTED,
    ),
}


@pytest.mark.parametrize(("body", "expected"), CASES.values(), ids=CASES.keys())
def test_hostile_input_is_refused_by_name_or_stored_readable(
    client: httpx.Client, body: dict[str, Any] | str, expected: Refused | None
) -> None:
    response = post(client, body)
    if expected is ACCEPTED:
        assert response.status_code == 202, response.text
        assert_readable(client, response.json()["id"])
        return
    error = assert_envelope(response)
    assert response.status_code == expected.status, response.text
    assert error["type"] == expected.type, error
    if expected.param is not None:
        assert error["param"] == expected.param, error
    if expected.rule is not None:
        assert error["details"][0]["rule"] == expected.rule, error
    # Nothing half-written: the refused body left no job behind.
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_refused_idempotent_submit_can_be_retried_with_the_same_key(client: httpx.Client) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    refused = post(client, request(vendor=nested(300)), **{"idempotency-key": key})
    assert refused.status_code == 422
    accepted = post(client, request(vendor=nested(3)), **{"idempotency-key": key})
    assert accepted.status_code == 202, accepted.text
    assert_readable(client, accepted.json()["id"])


@pytest.mark.parametrize("param", ["batch_id", "schedule_id"])
def test_a_nul_in_a_list_filter_is_a_422_naming_it(client: httpx.Client, param: str) -> None:
    response = client.get(f"/v1/jobs?{param}=%00")
    error = assert_envelope(response)
    assert response.status_code == 422
    assert (error["param"], error["details"][0]["rule"]) == (param, "nul_character")


def test_an_idempotency_key_over_255_characters_is_a_422(client: httpx.Client) -> None:
    response = post(client, request(), **{"idempotency-key": "k" * 256})
    error = assert_envelope(response)
    assert response.status_code == 422 and error["param"] == "header.idempotency-key", error


# --- fuzz: any JSON value at any pass-through place ---------------------------------------

# Characters as Python's json reads them: NUL and lone surrogates included.
CHARACTERS = st.characters() | st.sampled_from(["\x00", "\ud800", "\udfff"])
TEXT = (
    st.text(CHARACTERS, max_size=20)
    | st.sampled_from(["\ud83d\ude00", "\\u0000", ""])
    | st.builds(lambda n: "x" * n, st.integers(1000, 300_000))
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.builds(
        lambda digits, sign: sign * 10**digits, st.integers(19, 4000), st.sampled_from([1, -1])
    )
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
) | st.builds(nested, st.integers(60, 300), SCALARS)


def _message(value: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [value]}]


def _tool_call(value: Any) -> list[dict[str, Any]]:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": value}}
    return [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]


# Where a value goes, and how to find it again in the job as read back.
PLACES: dict[str, tuple[Any, Any]] = {
    "pass-through key": (
        lambda v: request(vendor_extension=v),
        lambda job: job["request"]["vendor_extension"],
    ),
    "metadata value": (
        lambda v: {**request(), "metadata": {"k": v}},
        lambda job: job["metadata"]["k"],
    ),
    "content part": (
        lambda v: {"request": {"messages": _message(v)}},
        lambda job: job["request"]["messages"][0]["content"][0],
    ),
    "message extra key": (
        lambda v: {"request": {"messages": [{"role": "user", "content": "x", "name": v}]}},
        lambda job: job["request"]["messages"][0]["name"],
    ),
    "tool arguments": (
        lambda v: {"request": {"messages": _tool_call(v)}},
        lambda job: job["request"]["messages"][1]["tool_calls"][0]["function"]["arguments"],
    ),
    "tool parameters": (
        lambda v: request(tools=[{"type": "function", "function": {"name": "f", "parameters": v}}]),
        lambda job: job["request"]["tools"][0]["function"]["parameters"],
    ),
    "response_format json_schema": (
        lambda v: request(response_format={"type": "json_schema", "json_schema": {"schema": v}}),
        lambda job: job["request"]["response_format"]["json_schema"]["schema"],
    ),
    "tool_choice": (lambda v: request(tool_choice=v), lambda job: job["request"]["tool_choice"]),
    "temperature": (lambda v: request(temperature=v), lambda job: job["request"]["temperature"]),
    "model": (lambda v: request(model=v), lambda job: job["request"]["model"]),
}


def same_json(sent: Any, read: Any) -> bool:
    """Equal as JSON values: JSONB keeps numbers as decimals (1e20 reads back as an integer)."""
    if isinstance(sent, bool) or isinstance(read, bool):
        return sent is read
    if isinstance(sent, int | float) and isinstance(read, int | float):
        return Decimal(repr(sent)) == Decimal(repr(read))
    if isinstance(sent, dict) and isinstance(read, dict):
        return sent.keys() == read.keys() and all(same_json(sent[k], read[k]) for k in sent)
    if isinstance(sent, list) and isinstance(read, list):
        return len(sent) == len(read) and all(map(same_json, sent, read))
    return bool(sent == read)


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(place=st.sampled_from(sorted(PLACES)), value=VALUES)
def test_any_json_value_anywhere_is_refused_by_name_or_read_back_as_sent(
    client: httpx.Client, place: str, value: Any
) -> None:
    build, find = PLACES[place]
    response = post(client, build(value))
    event(f"{place}: {response.status_code}")
    if response.status_code != 202:
        error = assert_envelope(response)
        assert error["type"] in ("invalid_request_error", "context_length_exceeded"), error
        return
    job_id = response.json()["id"]
    job = assert_readable(client, job_id)
    # What the JSON text means: "\ud800\udc00" is one character, U+10000.
    sent = json.loads(json.dumps(value))
    assert same_json(sent, find(job)), (sent, find(job))
    # Cancelled, so a worker of the session need not run the fuzz's jobs (409: it already
    # finished them).
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 409)


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01b", b"\xff\xfe", b"\xed\xa0\x80"])
def test_an_idempotency_key_with_control_or_non_utf8_bytes_is_never_a_5xx(
    api_url: str, api_key: str, value: bytes
) -> None:
    # Raw bytes on the wire: httpx refuses to send them. The server itself answers a control
    # byte with 400; other bytes arrive as latin-1 text, which Postgres stores.
    host, port = api_url.removeprefix("http://").split(":")
    body = json.dumps(request()).encode()
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer "
        + api_key.encode()
        + b"\r\nidempotency-key: "
        + value
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:500]
