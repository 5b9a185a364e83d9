"""OpenAI's Files + Batches API as an offload upstream (chatjobs.offload.upstream).

Upload the JSONL input (``POST {base}/files``, purpose ``batch``), create the batch
(``POST {base}/batches``, endpoint ``/v1/chat/completions``, window 24h, metadata
``{"chatjobs_ref": ref}``), poll it (``GET {base}/batches/{id}``), stream its output and error
files line by line (``GET {base}/files/{id}/content``), find one again by its ref
(``GET {base}/batches``, newest first), cancel it. chatjobs' own /v1/files and /v1/batches
speak the same shape, which is what the tests offload to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from chatjobs.errors import (
    UpstreamMalformedResponse,
    UpstreamStatusError,
)
from chatjobs.offload.upstream import (
    EarlierSubmit,
    Item,
    Result,
    Submitted,
    UpstreamBatch,
    send,
    stream_results,
)
from chatjobs.providers.base import bearer, join_url
from chatjobs.providers.openai import openai_body, openai_error

if TYPE_CHECKING:
    from chatjobs.routing import Route

# The states after which an OpenAI batch does not change any more.
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
# Per-line errors meaning the upstream never ran the request.
_UNFINISHED_CODES = frozenset({"batch_expired", "batch_cancelled"})
# The uploaded input goes by itself after this long (OpenAI keeps batch files otherwise).
_INPUT_EXPIRES_SECONDS = 30 * 86400
_PAGE = 100


def _send(client: httpx.Client, method: str, url: str, api_key: str, **kwargs: Any) -> Any:
    return send(client, method, url, bearer(api_key), openai_error, **kwargs)


def line_result(line: dict[str, Any]) -> Result | None:
    """One output or error file line as the item's outcome (None: no custom_id)."""
    job_id = line.get("custom_id")
    if not isinstance(job_id, str):
        return None
    response = line.get("response") or None
    error = line.get("error") or None
    if isinstance(response, dict):
        status = response.get("status_code")
        body = response.get("body")
        if isinstance(status, int) and 200 <= status < 300:
            if isinstance(body, dict) and body.get("choices"):
                return Result(job_id, completion=body)
            return Result(
                job_id,
                error=UpstreamMalformedResponse(
                    f"batch line answered {status} with JSON that has no choices",
                    status_code=status,
                ),
            )
        if isinstance(status, int):
            raw = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
            return Result(job_id, error=openai_error(status, {}, raw))
    if isinstance(error, dict):
        code = error.get("code")
        if code in _UNFINISHED_CODES:
            return Result(job_id, unfinished=True)
        return Result(
            job_id,
            error=UpstreamStatusError(
                f"batch line failed: {str(error.get('message') or code)[:500]}",
                code=None if code is None else str(code)[:200],
            ),
        )
    return Result(job_id, error=UpstreamMalformedResponse("batch line has no response"))


class OpenAIBatch:
    """The ``openai-batch`` offload upstream."""

    name = "openai-batch"
    max_items = 50_000
    max_bytes = 200 * 1024 * 1024
    # OpenAI's only window; tests against chatjobs' own batches shorten it to see expiries.
    completion_window = "24h"

    def encode(self, item: Item) -> bytes:
        body = openai_body(item.request, str(item.request.get("model") or ""))
        # A batch line is never streamed.
        body.pop("stream", None)
        body.pop("stream_options", None)
        line = {
            "custom_id": item.job_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    def submit(
        self, client: httpx.Client, route: Route, encoded: Sequence[bytes], *, ref: str
    ) -> Submitted:
        key = route.api_key()
        uploaded = _send(
            client,
            "POST",
            join_url(route.base_url, "files"),
            key,
            data={
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": str(_INPUT_EXPIRES_SECONDS),
            },
            files={"file": (f"chatjobs-{ref}.jsonl", b"".join(encoded), "application/jsonl")},
        )
        file_id = str(uploaded["id"])
        created = _send(
            client,
            "POST",
            join_url(route.base_url, "batches"),
            key,
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": self.completion_window,
                "metadata": {"chatjobs_ref": ref},
            },
        )
        return Submitted(upstream_batch_id=str(created["id"]), upstream_file_id=file_id)

    def find(self, client: httpx.Client, route: Route, earlier: EarlierSubmit) -> str | None:
        # Its batches carry the row's ref in their metadata: that is proof enough.
        ref, since = earlier.ref, earlier.since
        key = route.api_key()
        after: str | None = None
        oldest = since.timestamp()
        while True:
            params: dict[str, Any] = {"limit": _PAGE}
            if after:
                params["after"] = after
            page = _send(client, "GET", join_url(route.base_url, "batches"), key, params=params)
            data = page.get("data") or []
            for batch in data:
                if (batch.get("metadata") or {}).get("chatjobs_ref") == ref:
                    return str(batch["id"])
            # Newest first: once a page reaches back before the row, nothing older matters.
            if not data or not page.get("has_more"):
                return None
            if min(int(b.get("created_at") or 0) for b in data) < oldest - 60:
                return None
            after = str(data[-1]["id"])

    def poll(self, client: httpx.Client, route: Route, upstream_batch_id: str) -> UpstreamBatch:
        url = join_url(route.base_url, f"batches/{upstream_batch_id}")
        batch = _send(client, "GET", url, route.api_key())
        status = str(batch.get("status"))
        errors = (batch.get("errors") or {}).get("data") or []
        error = "; ".join(str(e.get("message") or e.get("code")) for e in errors)[:2000] or None
        return UpstreamBatch(
            upstream_batch_id=upstream_batch_id,
            status=status,
            ended=status in ENDED,
            output_ref=batch.get("output_file_id"),
            error_ref=batch.get("error_file_id"),
            error=error,
        )

    def results(self, client: httpx.Client, route: Route, batch: UpstreamBatch) -> Iterator[Result]:
        for file_id in (batch.output_ref, batch.error_ref):
            if file_id:
                yield from self._file_results(client, route, file_id)

    def _file_results(self, client: httpx.Client, route: Route, file_id: str) -> Iterator[Result]:
        url = join_url(route.base_url, f"files/{file_id}/content")
        return stream_results(client, url, bearer(route.api_key()), openai_error, line_result)

    def cancel(self, client: httpx.Client, route: Route, upstream_batch_id: str) -> None:
        url = join_url(route.base_url, f"batches/{upstream_batch_id}/cancel")
        try:
            _send(client, "POST", url, route.api_key())
        except UpstreamStatusError as exc:
            # Ended already (OpenAI and chatjobs answer 409 or 400): nothing to cancel.
            if exc.status_code not in (400, 409):
                raise
