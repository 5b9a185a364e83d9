"""The OpenAPI document as the API behaves, checked by Schemathesis (tests/contract).

FastAPI's generated document knows the handlers' parameters and response models, not the
rest of the contract: the bearer key every /v1 operation needs (``api/auth.py`` reads the
header before FastAPI does), the error envelope of ``api/errors.py`` under every status an
operation can answer, the headers every response carries, and shapes a custom validator
enforces. Routes declare their statuses with ``responses=errors(...)``; ``install`` adds the
rest to the generated document once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field

from chatjobs import files

_REF = "#/components/schemas/"


class ErrorDetail(BaseModel):
    """One rule a 422 request broke."""

    param: str = Field(description="where: a dotted path into the body, or a parameter name")
    rule: str | None = Field(default=None, description="the rule, e.g. missing, string_type")
    message: str


class ErrorInfo(BaseModel):
    type: str = Field(
        description="authentication_error, not_found, conflict, request_too_large, "
        "invalid_request_error, rate_limit_exceeded, internal_error, service_unavailable, ..."
    )
    message: str
    param: str | None = Field(default=None, description="the first field at fault (400, 422)")
    code: str | None = Field(default=None, description="a finer cause, where one applies")
    details: list[ErrorDetail] | None = Field(default=None, description="every field at fault")
    request_id: str | None = Field(default=None, description="the id the API logged it under")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorInfo


class Readiness(BaseModel):
    """Whether Postgres and Redis answer; each check is ``ok`` or why not."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
# api/errors.py: on every 4xx but 408 and 429, so OpenAI's SDKs do not resend (they would a 409).
_SHOULD_RETRY = {
    "description": "`false`: resending the same request will not help",
    "schema": {"type": "string", "enum": ["false"]},
}
# api/request_id.py: on every response, the client's own id when it sent a sane one.
_REQUEST_ID = {
    "description": "the request's id, as the API logged it",
    "required": True,
    "schema": {"type": "string"},
}

_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "The body is not UTF-8 text (`http_error`)."},
    401: {
        "description": "The API key is missing, malformed, unknown or revoked "
        "(`authentication_error`).",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    },
    404: {"description": "No such resource for this tenant (`not_found`)."},
    409: {"description": "The resource is in a state that refuses this (`conflict`)."},
    413: {
        "description": "The body exceeds CHATJOBS_MAX_BODY_BYTES (`request_too_large`).",
    },
    422: {
        "description": "The request does not validate (`invalid_request_error`): `param` "
        "names the first field at fault, `details` every one."
    },
    429: {
        "description": "A per-tenant limit is reached (`rate_limit_exceeded`): submissions "
        "per second, queued jobs or open event streams.",
        "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}},
    },
    500: {
        "description": "An unexpected error (`internal_error`, logged under `request_id`) or "
        "a misconfigured service (`configuration_error`)."
    },
    503: {
        "description": "Postgres is unavailable, or too many large bodies are being read "
        "at once (`service_unavailable`); retry after Retry-After.",
        "headers": {"Retry-After": _RETRY_AFTER},
    },
}


def errors(
    *statuses: int, described: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: the error envelope under each status, described
    as ``described`` says for this route, else as for every route."""
    described = described or {}
    return {
        status: {
            "model": ErrorResponse,
            **_ERRORS[status],
            **({"description": described[status]} if status in described else {}),
        }
        for status in statuses
    }


# Every /v1 operation: the key is checked first, any handler can meet an unexpected error, and
# every one reads Postgres (the key, at least).
V1_ERRORS = errors(401, 500, 503)

READINESS: dict[int | str, dict[str, Any]] = {
    200: {"model": Readiness, "description": "Postgres and Redis both answer."},
    503: {"model": Readiness, "description": "One of them does not; `checks` says which."},
}


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", **data},
        },
    }


# Open API 3.1 has an event stream's `schema` describe one event (3.2 calls it `itemSchema`).
EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: `status` (the job's read shape) at once and on "
        "every change, `delta` (content as it streams, for `stream: true` requests), then "
        "`done` with the final status.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "oneOf": [
                        _event("status", {"contentSchema": {"$ref": _REF + "JobRead"}}),
                        _event("delta", {}),
                        _event(
                            "done",
                            {
                                "contentSchema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"$ref": _REF + "JobStatus"}},
                                }
                            },
                        ),
                    ]
                }
            }
        },
    }
}

# The README's first request, as the example of POST /v1/jobs (Schemathesis sends it too).
SUBMIT_EXAMPLE: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {
                "examples": {
                    "chat": {
                        "summary": "one chat completion, streamed upstream",
                        "value": {
                            "request": {
                                "model": "gpt-4.1",
                                "messages": [{"role": "user", "content": "Explain recursion."}],
                                "stream": True,
                                "stream_options": {"include_usage": True},
                            },
                            "metadata": {"ticket": "T-1"},
                        },
                    }
                }
            }
        }
    }
}

# POST /v1/files reads its multipart body itself (api/multipart.py): say what it takes.
UPLOAD_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the content, sent with its filename; at most "
                            "CHATJOBS_MAX_UPLOAD_BYTES (200 MB unless set)",
                        },
                        "purpose": {
                            "type": "string",
                            "enum": list(files.UPLOAD_PURPOSES),
                            "description": "only `batch` files can feed a batch",
                        },
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": files.MIN_EXPIRY_SECONDS,
                            "maximum": files.MAX_EXPIRY_SECONDS,
                            "description": "the file is deleted this long after it is "
                            "created; without it, `batch` files live CHATJOBS_FILE_EXPIRY_"
                            "SECONDS (30 days unless set) and others until deleted",
                        },
                    },
                    "dependentRequired": {
                        "expires_after[anchor]": ["expires_after[seconds]"],
                        "expires_after[seconds]": ["expires_after[anchor]"],
                    },
                },
                "encoding": {"file": {"contentType": "application/octet-stream"}},
            }
        },
    }
}

FILE_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes as uploaded (a batch's output or error file: its "
        "JSONL lines).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

# `Message.content` is checked by a plain validator (one clear message instead of one per
# member of a union), which leaves pydantic nothing to describe: say what it accepts.
MESSAGE_CONTENT: dict[str, Any] = {
    "title": "Content",
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {},
            "description": 'content parts, e.g. {"type": "text", "text": "..."}, '
            "stored and forwarded as sent",
        },
        {"type": "null"},
    ],
}


# Where a response's ids lead (Open API links): a client generator shows them, and
# Schemathesis's stateful phase follows them from a job it created to the job's other routes.
_JOB = {"job_id": "$response.body#/id"}
_FILE = {"file_id": "$response.body#/id"}
_SCHEDULE = {"schedule_id": "$response.body#/id"}
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("post", "/v1/jobs", "202"): {
        "GetJob": ("get", "/v1/jobs/{job_id}", _JOB),
        "CancelJob": ("post", "/v1/jobs/{job_id}/cancel", _JOB),
        "ListSteps": ("get", "/v1/jobs/{job_id}/steps", _JOB),
        "JobEvents": ("get", "/v1/jobs/{job_id}/events", _JOB),
        "ListDeliveries": ("get", "/v1/jobs/{job_id}/deliveries", _JOB),
    },
    ("post", "/v1/files", "200"): {
        "GetFile": ("get", "/v1/files/{file_id}", _FILE),
        "FileContent": ("get", "/v1/files/{file_id}/content", _FILE),
        "DeleteFile": ("delete", "/v1/files/{file_id}", _FILE),
    },
    ("post", "/v1/schedules", "201"): {
        "GetSchedule": ("get", "/v1/schedules/{schedule_id}", _SCHEDULE),
        "UpdateSchedule": ("patch", "/v1/schedules/{schedule_id}", _SCHEDULE),
        "TriggerSchedule": ("post", "/v1/schedules/{schedule_id}/trigger", _SCHEDULE),
        "BackfillSchedule": ("post", "/v1/schedules/{schedule_id}/backfill", _SCHEDULE),
        "ListFirings": ("get", "/v1/schedules/{schedule_id}/firings", _SCHEDULE),
        "DeleteSchedule": ("delete", "/v1/schedules/{schedule_id}", _SCHEDULE),
    },
    ("get", "/v1/jobs/{job_id}/deliveries", "200"): {
        "Redeliver": (
            "post",
            "/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver",
            {"job_id": "$request.path.job_id", "delivery_id": "$response.body#/0/id"},
        ),
    },
}

BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key from `chatjobs keys create`: `Authorization: Bearer <key>`.",
}


def install(app: FastAPI) -> None:
    """Serve the generated document with the contract added (built once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = amend(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def amend(doc: dict[str, Any]) -> dict[str, Any]:
    """Add what the generated document leaves out (see the module docstring)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    doc["components"]["securitySchemes"] = {"bearerAuth": BEARER}
    for path, operation in _operations(doc):
        if path.startswith("/v1/"):
            operation["security"] = [{"bearerAuth": []}]
        responses = operation.get("responses", {})
        if "422" in responses and _is_fastapi_422(responses["422"]):
            if operation.get("parameters") or "requestBody" in operation:
                responses["422"] = {
                    "description": _ERRORS[422]["description"],
                    "content": {"application/json": {"schema": {"$ref": _REF + "ErrorResponse"}}},
                }
            else:  # only the Authorization header, hidden and read by hand: nothing to refuse
                del responses["422"]
        for status, response in responses.items():
            response.setdefault("headers", {})["x-request-id"] = _REQUEST_ID
            if status.isdigit() and 400 <= int(status) < 500 and status not in ("408", "429"):
                response["headers"]["x-should-retry"] = _SHOULD_RETRY
    for (method, path, status), links in LINKS.items():
        response = doc["paths"][path][method]["responses"][status]
        response["links"] = {
            name: {
                "operationId": doc["paths"][target][verb]["operationId"],
                "parameters": parameters,
            }
            for name, (verb, target, parameters) in links.items()
        }
    # FastAPI's own 422 body ({"detail": [...]}); api/errors.py answers the envelope.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if "ErrorResponse" not in schemas:  # no route declared an error status
        envelope = ErrorResponse.model_json_schema(ref_template=_REF + "{model}")
        schemas.update(envelope.pop("$defs"), ErrorResponse=envelope)
    if "Message" in schemas:
        schemas["Message"]["properties"]["content"] = MESSAGE_CONTENT
    return doc


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            yield path, operation


def _is_fastapi_422(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref") == _REF + "HTTPValidationError")
