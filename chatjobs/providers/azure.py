"""Azure OpenAI: ``POST {endpoint}/openai/deployments/{deployment}/chat/completions
?api-version={api_version}`` with the key in an ``api-key`` header; OpenAI-shape answers.

A prompt the content filter refuses answers 400 with ``error.code = "content_filter"`` and
``error.innererror = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {...}}``;
that is terminal (is_retryable), and the filter result is kept on the job's error record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from chatjobs.errors import UpstreamStatusError
from chatjobs.providers.base import (
    CallContext,
    Headers,
    Outgoing,
    error_payload,
)
from chatjobs.providers.openai import OpenAIAdapter, openai_body, openai_error

if TYPE_CHECKING:
    from chatjobs.routing import Route


def azure_error(status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
    """OpenAI's error shape, with the content filter's verdict kept as the error's detail."""
    err = openai_error(status, headers, body)
    payload = error_payload(body)
    error = payload.get("error") if isinstance(payload, dict) else None
    inner = error.get("innererror") if isinstance(error, dict) else None
    if isinstance(inner, dict):
        detail: dict[str, Any] = {"innererror_code": inner.get("code")}
        if isinstance(inner.get("content_filter_result"), dict):
            detail["content_filter_result"] = inner["content_filter_result"]
        err.detail = detail
    return err


class AzureAdapter(OpenAIAdapter):
    """An Azure OpenAI deployment: the deployment names the model, so the body carries none;
    answers and streams are OpenAI's (inherited)."""

    name = "azure"

    def build(
        self,
        request: dict[str, Any],
        *,
        model: str,
        route: Route,
        api_key: str,
        context: CallContext,
    ) -> Outgoing:
        url = (
            f"{route.endpoint}/openai/deployments/{route.deployment}/chat/completions"
            f"?api-version={quote(route.api_version)}"
        )
        headers = {"api-key": api_key} if api_key else {}
        body = openai_body(request, model)
        del body["model"]  # the deployment is the model
        return Outgoing("POST", url, headers, body)

    def parse_error(self, status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
        return azure_error(status, headers, body)
