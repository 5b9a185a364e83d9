"""The OpenAPI document says what the API does (the running check is tests/contract)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api import methods
from api.app import create_app
from api.routes.webhooks import EnableUrl, RotateSecret

# Every status each operation answers; the 2xx first.
STATUSES = {
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("post", "/v1/jobs"): {"202", "400", "401", "409", "413", "422", "429", "500", "503"},
    ("get", "/v1/jobs"): {"200", "401", "422", "500", "503"},
    ("get", "/v1/jobs/{job_id}"): {"200", "401", "404", "422", "500", "503"},
    ("post", "/v1/jobs/{job_id}/cancel"): {
        *("200", "401", "404", "409", "413", "422", "500", "503"),
    },
    ("get", "/v1/jobs/{job_id}/steps"): {"200", "401", "404", "422", "500", "503"},
    ("get", "/v1/jobs/{job_id}/events"): {"200", "401", "404", "422", "429", "500", "503"},
    ("get", "/v1/jobs/{job_id}/deliveries"): {"200", "401", "404", "422", "500", "503"},
    ("post", "/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver"): {
        *("200", "401", "404", "409", "413", "422", "500", "503"),
    },
    ("get", "/v1/webhooks/secret"): {"200", "401", "500", "503"},
    ("post", "/v1/webhooks/secret/rotate"): {"200", "400", "401", "413", "422", "500", "503"},
    ("get", "/v1/webhooks/disabled"): {"200", "401", "500", "503"},
    ("post", "/v1/webhooks/enable"): {"200", "400", "401", "404", "413", "422", "500", "503"},
    ("get", "/v1/keys"): {"200", "401", "500", "503"},
    ("post", "/v1/batches"): {"200", "400", "401", "409", "413", "422", "500", "503"},
    ("get", "/v1/batches"): {"200", "401", "422", "500", "503"},
    ("get", "/v1/batches/{batch_id}"): {"200", "401", "404", "422", "500", "503"},
    ("post", "/v1/batches/{batch_id}/cancel"): {
        *("200", "401", "404", "409", "413", "422", "500", "503"),
    },
    ("post", "/v1/batches/{batch_id}/retry"): {
        *("200", "400", "401", "404", "409", "413", "422", "500", "503"),
    },
    ("get", "/v1/batches/{batch_id}/results"): {"200", "400", "401", "404", "422", "500", "503"},
    ("delete", "/v1/keys/{prefix}"): {"200", "401", "404", "409", "422", "500", "503"},
    ("post", "/v1/files"): {"200", "400", "401", "409", "413", "422", "500", "503"},
    ("get", "/v1/files"): {"200", "401", "422", "500", "503"},
    ("get", "/v1/files/{file_id}"): {"200", "401", "404", "422", "500", "503"},
    ("get", "/v1/files/{file_id}/content"): {"200", "401", "404", "422", "500", "503"},
    ("delete", "/v1/files/{file_id}"): {"200", "401", "404", "422", "500", "503"},
    ("post", "/v1/schedules"): {"201", "400", "401", "409", "413", "422", "500", "503"},
    ("get", "/v1/schedules"): {"200", "401", "422", "500", "503"},
    ("get", "/v1/schedules/{schedule_id}"): {"200", "401", "404", "422", "500", "503"},
    ("patch", "/v1/schedules/{schedule_id}"): {
        *("200", "400", "401", "404", "413", "422", "500", "503"),
    },
    ("delete", "/v1/schedules/{schedule_id}"): {"204", "401", "404", "422", "500", "503"},
    ("post", "/v1/schedules/{schedule_id}/trigger"): {
        *("201", "401", "404", "413", "422", "500", "503"),
    },
    ("post", "/v1/schedules/{schedule_id}/backfill"): {
        *("200", "400", "401", "404", "413", "422", "500", "503"),
    },
    ("get", "/v1/schedules/{schedule_id}/firings"): {"200", "401", "404", "422", "500", "503"},
    ("get", "/v1/usage"): {"200", "401", "422", "500", "503"},
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    document: dict[str, Any] = create_app().openapi()
    return document


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    }


def test_every_v1_operation_requires_the_bearer_key(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for (method, path), operation in _operations(doc).items():
        expected = [{"bearerAuth": []}] if path.startswith("/v1/") else None
        assert operation.get("security") == expected, (method, path)


def test_every_operation_declares_each_status_it_answers(doc: dict[str, Any]) -> None:
    # A new route joins the table: its statuses are a decision, not FastAPI's default.
    assert {key: set(op["responses"]) for key, op in _operations(doc).items()} == STATUSES


def test_errors_are_documented_as_the_envelope_the_api_answers(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert set(schemas["ErrorInfo"]["required"]) == {"type", "message"}
    for (method, path), operation in _operations(doc).items():
        for status, response in operation["responses"].items():
            assert response["headers"]["x-request-id"]["required"] is True
            if int(status) < 400 or path == "/readyz":
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)


def test_every_4xx_but_408_and_429_documents_x_should_retry(doc: dict[str, Any]) -> None:
    for (method, path), operation in _operations(doc).items():
        for status, response in operation["responses"].items():
            refuses = 400 <= int(status) < 500 and status not in ("408", "429")
            assert ("x-should-retry" in response["headers"]) is refuses, (method, path, status)
    assert "code" in doc["components"]["schemas"]["ErrorInfo"]["properties"]


def test_the_upload_is_documented_as_the_sdks_multipart_form(doc: dict[str, Any]) -> None:
    body = doc["paths"]["/v1/files"]["post"]["requestBody"]
    form = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] is True and list(body["content"]) == ["multipart/form-data"]
    assert form["required"] == ["file", "purpose"]
    assert form["properties"]["file"] == {**form["properties"]["file"], "format": "binary"}
    assert set(form["properties"]) == {
        *("file", "purpose", "expires_after[anchor]", "expires_after[seconds]"),
    }
    content = doc["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["application/octet-stream"]


def test_message_content_is_a_string_an_array_of_parts_or_null(doc: dict[str, Any]) -> None:
    content = doc["components"]["schemas"]["Message"]["properties"]["content"]
    assert [branch["type"] for branch in content["anyOf"]] == ["string", "array", "null"]


def test_event_stream_documents_each_event(doc: dict[str, Any]) -> None:
    ok = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    events = ok["content"]["text/event-stream"]["schema"]["oneOf"]
    assert [e["properties"]["event"]["const"] for e in events] == ["status", "delta", "done"]


def test_small_bodies_are_documented_strict(doc: dict[str, Any]) -> None:
    rotate = doc["components"]["schemas"]["RotateSecret"]
    assert rotate["additionalProperties"] is False
    assert rotate["properties"]["overlap_seconds"]["type"] == "integer"
    assert doc["components"]["schemas"]["EnableUrl"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "body",
    [
        '{"overlap_seconds": false}',
        '{"overlap_seconds": "1e3"}',
        '{"overlap_seconds": 60.5}',
        '{"overlap_seconds": -1}',
        '{"overlap_seconds": 2592001}',
        '{"overlap": 60}',
    ],
)
def test_rotate_refuses_what_is_not_a_whole_number_of_seconds_in_range(body: str) -> None:
    with pytest.raises(ValidationError):
        RotateSecret.model_validate_json(body)


@pytest.mark.parametrize(
    ("body", "seconds"),
    [("{}", 86400), ('{"overlap_seconds": 0}', 0), ('{"overlap_seconds": 1e3}', 1000)],
)
def test_rotate_takes_json_integers_including_whole_floats(body: str, seconds: int) -> None:
    assert RotateSecret.model_validate_json(body).overlap_seconds == seconds


def test_enable_refuses_a_url_that_is_not_a_string() -> None:
    with pytest.raises(ValidationError):
        EnableUrl.model_validate_json('{"url": 1}')


def test_method_not_allowed_lists_every_method_of_the_path() -> None:
    app = FastAPI()
    app.get("/things")(lambda: [])
    app.post("/things")(lambda: {})
    methods.install(app)
    answer = TestClient(app).request("OPTIONS", "/things")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"
    assert answer.json()["error"]["type"] == "method_not_allowed"
