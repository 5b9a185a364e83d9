"""The API's error envelope for errors that are nobody's request: the deployment's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import errors
from chatjobs.errors import ChatJobsError, ConfigurationError
from chatjobs.routing import ModelsFileError, load_models_file


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
