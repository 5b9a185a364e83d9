"""The API's error envelope for errors that are nobody's request (the deployment's own, a bug)
and the request id every response carries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from api import errors
from api.app import create_app
from chatjobs.errors import ChatJobsError, ConfigurationError
from chatjobs.routing import ModelsFileError, load_models_file
from chatjobs.settings import get_settings


def _app_loading(path: Path) -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.get("/models")
    def models() -> dict[str, int]:
        return {"models": len(load_models_file(path))}

    return app


@pytest.mark.parametrize(
    "content",
    ["[models.'gpt-4.1'\nrpm = 1", "[models.'gpt-4.1']\nrpm = 0", "[other]\nx = 1"],
    ids=["not-toml", "bad-field", "unknown-key"],
)
def test_a_broken_models_file_is_a_500_configuration_error_envelope(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(content)
    with TestClient(_app_loading(path), raise_server_exceptions=False) as client:
        response = client.get("/models")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "configuration_error"
    # The client is told it is the operator's problem; the path stays in the log.
    assert str(tmp_path) not in error["message"]
    assert str(path) in caplog.text


def test_a_missing_models_file_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="CHATJOBS_MODELS_FILE"):
        load_models_file(Path("/nonexistent/models.toml"))


def test_models_file_error_is_under_the_one_error_base() -> None:
    assert issubclass(ModelsFileError, ConfigurationError)
    assert issubclass(ConfigurationError, ChatJobsError)


# --- one error contract: every response has an id; an unexpected error is a 500 envelope ---


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    """The real application, with test-only routes outside /v1 (no key, no database)."""
    monkeypatch.setenv("CHATJOBS_MAX_BODY_BYTES", "2048")
    get_settings.cache_clear()
    app = create_app()

    def boom() -> None:
        raise RuntimeError("a bug nobody foresaw")

    def stream_boom() -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            yield b"first\n"
            raise RuntimeError("a bug mid-stream")

        return StreamingResponse(chunks(), media_type="text/plain")

    app.add_api_route("/boom", boom, methods=["GET", "POST"])
    app.add_api_route("/stream-boom", stream_boom)
    yield app
    get_settings.cache_clear()


def test_an_unexpected_exception_is_a_500_envelope_with_the_logged_request_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error"
    assert "a bug nobody foresaw" not in error["message"]
    rid = response.headers["x-request-id"]
    assert error["request_id"] == rid
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "a bug nobody foresaw" in caplog.text


def test_a_sane_client_request_id_is_kept_and_any_other_replaced(app: FastAPI) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        kept = client.get("/healthz", headers={"x-request-id": "trace-1.a_B"})
        too_long = client.get("/healthz", headers={"x-request-id": "a" * 65})
        odd = client.get("/healthz", headers={"x-request-id": "a b\\n"})
        failed = client.get("/boom", headers={"x-request-id": "trace-2"})
    assert kept.headers["x-request-id"] == "trace-1.a_B"
    assert too_long.headers["x-request-id"] != "a" * 65
    assert odd.headers["x-request-id"].startswith("req_")
    assert failed.headers["x-request-id"] == failed.json()["error"]["request_id"] == "trace-2"


def test_every_kind_of_response_carries_a_request_id(app: FastAPI) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        responses = {
            "ok": client.get("/healthz"),
            "404": client.get("/no-such-route"),
            "405": client.delete("/healthz"),
            "401": client.get("/v1/jobs"),
            # Outside /v1 a body is capped at 64 KiB (api/limits.py SMALL_BODY_BYTES).
            "413 from a middleware": client.post("/boom", content=b"x" * 70_000),
            "500": client.get("/boom"),
            "streamed then failed": client.get("/stream-boom"),
        }
    ids = {name: r.headers.get("x-request-id") for name, r in responses.items()}
    assert all(ids.values()), ids
    assert len(set(ids.values())) == len(ids)
    assert responses["413 from a middleware"].status_code == 413
    assert responses["streamed then failed"].status_code == 200


def test_a_nul_in_a_query_parameter_is_a_422_naming_it(app: FastAPI) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/jobs?limit=5&batch_id=%00x")
        encoded_twice = client.get("/healthz?x=%2500")
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "batch_id")
    assert error["details"][0]["rule"] == "nul_character"
    assert response.headers["x-request-id"]
    assert encoded_twice.status_code == 200  # "%00" as text, not NUL
