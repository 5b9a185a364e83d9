"""`chatjobs batch ...`: OpenAI-compatible batches from the command line.

A client like any other: httpx against the HTTP API (``--api-url`` / CHATJOBS_API_URL, a Bearer
``--api-key`` / CHATJOBS_API_KEY), never the database. Files go up and come down streamed, as
a batch file may be larger than memory.

A request that times out, loses its connection or is answered 429/502/503/504 is sent again
after Retry-After (else a growing pause). Every POST carries an Idempotency-Key made once per
invocation and kept across those resends, so a resent upload or batch creation returns what
the first one made instead of making a second.

Exit status: 0 every line succeeded; 1 the batch failed validation, or some line failed,
expired or was cancelled; 2 a usage or HTTP error; 130 waiting was stopped by Ctrl-C (the
batch goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from chatjobs.upstream import retry_after

DEFAULT_API_URL = "http://127.0.0.1:8000"
ENDPOINT = "/v1/chat/completions"
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
OK, LINES_FAILED, ERROR, INTERRUPTED = 0, 1, 2, 130

POLL_SECONDS = 1.0
ATTEMPTS = 6  # sends of one request; the pauses between them add up to ~15 s without Retry-After
PAUSE_CAP_SECONDS = 60.0  # the longest Retry-After obeyed between two sends
RESEND_STATUSES = frozenset({429, 502, 503, 504})
# The read timeout covers the server storing a large upload before it answers.
TIMEOUT = httpx.Timeout(120.0, connect=10.0)

Sleep = Callable[[float], None]


class ApiError(Exception):
    """The API refused a request or could not be reached (exit status 2)."""

    def __init__(self, message: str, param: str | None = None, status_code: int | None = None):
        super().__init__(message, param, status_code)
        self.message, self.param, self.status_code = message, param, status_code

    def __str__(self) -> str:
        return f"{self.message} ({self.param})" if self.param else self.message


def _refusal(response: httpx.Response) -> ApiError:
    """The API's error envelope ``{"error": {"message", "param", ...}}`` as an ApiError."""
    try:
        error = response.json()["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = f"HTTP {response.status_code}: {response.text[:200]}", None
    return ApiError(message, param if isinstance(param, str) else None, response.status_code)


class Api:
    """The chatjobs API over one httpx client: resends, the error envelope, streamed bodies."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        transport: httpx.BaseTransport | None = None,
        sleep: Sleep = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # An OpenAI-style base URL (…/v1) names the same API: the paths here carry the /v1.
        base_url = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(
            base_url=base_url, headers=headers, timeout=TIMEOUT, transport=transport
        )
        self.sleep = sleep

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self._json(self._send("GET", path, params=_query(params)))

    def post(self, path: str, *, key: str | None, **content: Any) -> dict[str, Any]:
        """POST ``content`` (httpx's json=, files=, data=); ``key`` is the Idempotency-Key,
        the same for every resend of this request."""
        headers = {"Idempotency-Key": key} if key else None
        return self._json(self._send("POST", path, headers=headers, **content))

    def patch(self, path: str, **content: Any) -> dict[str, Any]:
        return self._json(self._send("PATCH", path, **content))

    def delete(self, path: str) -> None:
        self._send("DELETE", path).close()

    def save(self, path: str, dest: Path, **params: Any) -> int:
        """Stream the body of a GET to ``dest`` (whole or not at all); the lines written."""
        part = dest.with_name(dest.name + ".part")
        try:
            with part.open("wb") as out:
                lines = self.copy(path, out, **params)
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
        return lines

    def copy(self, path: str, out: IO[bytes], **params: Any) -> int:
        """Stream the body of a GET into ``out``; the lines written."""
        response = self._send("GET", path, stream=True, params=_query(params))
        lines = 0
        try:
            for chunk in response.iter_bytes():
                out.write(chunk)
                lines += chunk.count(b"\n")
        except httpx.TransportError as exc:
            raise ApiError(f"the download of {path} broke off: {exc}") from exc
        finally:
            response.close()
        return lines

    def _send(
        self, method: str, path: str, *, stream: bool = False, **options: Any
    ) -> httpx.Response:
        for attempt in range(1, ATTEMPTS + 1):
            # Built anew each time: an upload's multipart body rereads its file from the start.
            request = self.client.build_request(method, path, **options)
            last = attempt == ATTEMPTS
            try:
                response = self.client.send(request, stream=stream)
            except httpx.TransportError as exc:
                if last:
                    reason = str(exc) or type(exc).__name__
                    raise ApiError(f"no answer from {request.url}: {reason}") from exc
                self.sleep(_pause(attempt))
                continue
            if response.status_code in RESEND_STATUSES and not last:
                wait = retry_after(response.headers)
                response.close()
                self.sleep(min(_pause(attempt) if wait is None else wait, PAUSE_CAP_SECONDS))
                continue
            if response.is_error:
                response.read()
                response.close()
                raise _refusal(response)
            return response
        raise AssertionError("the last attempt returns or raises")

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise ApiError(f"{response.request.url} answered something not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(f"{response.request.url} answered JSON that is not an object")
        return body


def _query(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


def _pause(attempt: int) -> float:
    return float(min(0.5 * 2 ** (attempt - 1), PAUSE_CAP_SECONDS))


def with_model(line: bytes, model: str) -> bytes:
    """The input line with ``body.model`` set where it has none; any other line as it is
    (one that is not JSON is the server's to report, with its line number)."""
    try:
        row = json.loads(line)
    except ValueError:
        return line
    body = row.get("body") if isinstance(row, dict) else None
    if not isinstance(body, dict) or body.get("model") is not None:
        return line
    body["model"] = model
    ending = line[len(line.rstrip(b"\r\n")) :]
    return json.dumps(row, ensure_ascii=False).encode() + ending


@contextmanager
def upload_source(path: Path, model: str | None) -> Iterator[IO[bytes]]:
    """The input file, or with ``model`` a temporary copy with it filled in, line by line."""
    with path.open("rb") as source:
        if model is None:
            yield source
            return
        with tempfile.TemporaryFile() as rewritten:
            for line in source:
                rewritten.write(with_model(line, model))
            rewritten.seek(0)
            yield rewritten


def say(message: str) -> None:
    print(message, file=sys.stderr)


def _lines(count: int) -> str:
    return f"{count} line" if count == 1 else f"{count} lines"


def _time(seconds: int | None) -> str:
    return "-" if seconds is None else f"{datetime.fromtimestamp(seconds):%Y-%m-%d %H:%M:%S}"


def _counts(batch: dict[str, Any]) -> str:
    """``18 succeeded, 2 failed (1 expired)``: failed counts expired and cancelled lines too."""
    counts = batch["request_counts"]
    text = f"{counts['completed']} succeeded, {counts['failed']} failed"
    of_which = [f"{counts[k]} {k}" for k in ("expired", "cancelled") if counts.get(k)]
    return f"{text} ({', '.join(of_which)})" if of_which else text


def _all_succeeded(batch: dict[str, Any]) -> bool:
    counts = batch["request_counts"]
    return batch["status"] == "completed" and counts["completed"] == counts["total"]


class _RateColumn(ProgressColumn):
    """Lines finished per second, over rich's recent samples."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("- lines/s" if speed is None else f"{speed:.1f} lines/s")


def _show(progress: Progress, task: Any, batch: dict[str, Any]) -> None:
    counts = batch["request_counts"]
    progress.update(
        task,
        description=batch["status"],
        total=counts["total"] or None,
        completed=counts["completed"] + counts["failed"],
        failed=counts["failed"],
    )


def wait(api: Api, batch: dict[str, Any]) -> dict[str, Any]:
    """Poll the batch about every second, with a progress bar on stderr, until it ends."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),  # the row fits 80 columns, as piped output is cut to
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        _RateColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task(batch["status"], total=None, failed=0)
        _show(progress, task, batch)
        while batch["status"] not in FINAL:
            api.sleep(POLL_SECONDS)
            batch = api.get(f"/v1/batches/{batch['id']}")
            _show(progress, task, batch)
    return batch


def _errors_path(output: Path) -> Path:
    """``in.errors.jsonl`` beside ``in.output.jsonl``; ``x.errors.jsonl`` beside ``x.jsonl``."""
    stem = output.name.removesuffix(".jsonl").removesuffix(".output")
    return output.with_name(f"{stem}.errors.jsonl")


def finish(api: Api, batch: dict[str, Any], *, output: Path) -> int:
    """Report an ended batch and download its output and error files; the exit status."""
    batch_id = batch["id"]
    if batch["status"] == "failed":
        say(f"batch {batch_id} failed validation:")
        for error in (batch.get("errors") or {}).get("data") or []:
            where = f"line {error['line']}" if error.get("line") is not None else "file"
            say(f"  {where}: {error.get('code')}: {error.get('message')}")
        return LINES_FAILED
    # A batch whose every line failed ends completed with no output file: nothing to write.
    if batch.get("output_file_id"):
        lines = api.save(f"/v1/files/{batch['output_file_id']}/content", output)
        say(f"output: {output} ({_lines(lines)})")
    if batch.get("error_file_id"):
        errors = _errors_path(output)
        lines = api.save(f"/v1/files/{batch['error_file_id']}/content", errors)
        say(f"errors: {errors} ({_lines(lines)})")
    say(f"batch {batch_id} {batch['status']}: {_counts(batch)}")
    if _all_succeeded(batch):
        return OK
    say(f"not every line succeeded; `chatjobs batch retry {batch_id}` runs those again")
    return LINES_FAILED


def follow(api: Api, batch: dict[str, Any], *, output: Path) -> int:
    """Wait for the batch, then finish it; Ctrl-C (or a lost API) stops only the waiting."""
    resume = f"chatjobs batch status {batch['id']} --wait --output {output}"
    try:
        batch = wait(api, batch)
    except KeyboardInterrupt:
        say(f"stopped waiting; batch {batch['id']} goes on. To wait again: {resume}")
        return INTERRUPTED
    except ApiError as exc:
        say(f"error: {exc}")
        say(f"stopped waiting; batch {batch['id']} may go on. To wait again: {resume}")
        return ERROR
    return finish(api, batch, output=output)


def submit(ns: argparse.Namespace, api: Api) -> int:
    path = Path(ns.file)
    key = uuid.uuid4().hex
    with upload_source(path, ns.model) as source:
        uploaded = api.post(
            "/v1/files",
            key=f"{key}-file",
            files={"file": (path.name, source, "application/jsonl")},
            data={"purpose": "batch"},
        )
    body: dict[str, Any] = {
        "input_file_id": uploaded["id"],
        "endpoint": ENDPOINT,
        "completion_window": ns.window,
    }
    if ns.metadata:
        body["metadata"] = dict(ns.metadata)
    if ns.webhook_url:
        body["webhook_url"] = ns.webhook_url
    batch = api.post("/v1/batches", key=f"{key}-batch", json=body)
    print(batch["id"], flush=True)
    if not ns.wait:
        return OK
    return follow(api, batch, output=ns.output or path.with_name(f"{path.stem}.output.jsonl"))


def status(ns: argparse.Namespace, api: Api) -> int:
    batch = api.get(f"/v1/batches/{ns.id}")
    if ns.wait:
        return follow(api, batch, output=ns.output or Path(f"{ns.id}.output.jsonl"))
    counts, metadata = batch["request_counts"], batch.get("metadata") or {}
    table = Table.grid(padding=(0, 2))
    for name, value in (
        ("id", batch["id"]),
        ("status", batch["status"]),
        ("lines", f"{counts['total']} total, {_counts(batch)}"),
        ("running", str(counts.get("in_progress", 0))),
        ("created", _time(batch.get("created_at"))),
        ("expires", _time(batch.get("expires_at"))),
        ("output file", batch.get("output_file_id") or "-"),
        ("error file", batch.get("error_file_id") or "-"),
        ("metadata", " ".join(f"{k}={v}" for k, v in metadata.items()) or "-"),
    ):
        table.add_row(name, value)
    for error in (batch.get("errors") or {}).get("data") or []:
        table.add_row("error", f"line {error.get('line')}: {error['code']}: {error['message']}")
    console().print(table)
    return OK


def list_batches(ns: argparse.Namespace, api: Api) -> int:
    page = api.get("/v1/batches", limit=ns.limit, after=ns.after)
    table = Table("id", "status", "done/total", "failed", "created")
    for batch in page["data"]:
        counts = batch["request_counts"]
        done = counts["completed"] + counts["failed"]
        table.add_row(
            batch["id"],
            batch["status"],
            f"{done}/{counts['total']}",
            str(counts["failed"]),
            _time(batch["created_at"]),
        )
    console().print(table)
    if page.get("has_more"):
        say(f"more: chatjobs batch list --after {page['last_id']}")
    return OK


def cancel(ns: argparse.Namespace, api: Api) -> int:
    batch = api.post(f"/v1/batches/{ns.id}/cancel", key=None)
    say(f"batch {batch['id']} {batch['status']}: {_counts(batch)}")
    return OK


def retry(ns: argparse.Namespace, api: Api) -> int:
    batch = api.post(f"/v1/batches/{ns.id}/retry", key=f"{uuid.uuid4().hex}-retry")
    print(batch["id"], flush=True)
    if not ns.wait:
        return OK
    return follow(api, batch, output=ns.output or Path(f"{batch['id']}.output.jsonl"))


def results(ns: argparse.Namespace, api: Api) -> int:
    path = f"/v1/batches/{ns.id}/results"
    if ns.output is None:
        api.copy(path, sys.stdout.buffer, after=ns.after)
        sys.stdout.buffer.flush()
    else:
        lines = api.save(path, ns.output, after=ns.after)
        say(f"{ns.output}: {_lines(lines)}")
    return OK


def console() -> Console:
    # Piped, rich would fit the table to 80 columns and cut the ids short.
    return Console(width=None if sys.stdout.isatty() else 200)


def run(
    ns: argparse.Namespace,
    *,
    transport: httpx.BaseTransport | None = None,
    sleep: Sleep = time.sleep,
) -> int:
    """Run the parsed `chatjobs batch ...` (or other API client) command; its exit status."""
    try:
        with Api(base_url=ns.api_url, api_key=ns.api_key, transport=transport, sleep=sleep) as api:
            return int(ns.api_command(ns, api))
    except (ApiError, OSError) as exc:
        say(f"error: {exc}")
        return ERROR
    except KeyboardInterrupt:
        say("interrupted")
        return INTERRUPTED


def _main(ns: argparse.Namespace) -> NoReturn:
    sys.exit(run(ns))


def pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


def api_options() -> argparse.ArgumentParser:
    """The options of every command that is a client of the API: where it is, and the key."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api-url",
        default=os.environ.get("CHATJOBS_API_URL", DEFAULT_API_URL),
        help="the chatjobs API (default: CHATJOBS_API_URL, else %(default)s)",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("CHATJOBS_API_KEY"),
        help="sent as a Bearer token (default: CHATJOBS_API_KEY)",
    )
    return common


Command = Callable[[argparse.Namespace, Api], int]


def command_group(sub: Any, name: str, **options: Any) -> Callable[..., argparse.ArgumentParser]:
    """Add the command group ``name`` (parser ``options``: help, description, epilog) to the
    `chatjobs` subparsers ``sub``; a function ``command(name, func, help, *parents)`` that adds
    a command to it, run against the API by ``run``."""
    group = sub.add_parser(name, **options)
    commands = group.add_subparsers(dest=f"{name}_name", required=True)
    common = api_options()

    def command(
        command_name: str, func: Command, help: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        parser = commands.add_parser(command_name, help=help, parents=[common, *parents])
        parser.set_defaults(func=_main, api_command=func)
        return parser

    return command


def add_parser(sub: Any) -> None:
    """Add `batch` and its commands to the `chatjobs` subparsers ``sub``."""
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument(
        "--wait", action="store_true", help="show progress until it ends, then download"
    )
    waiting.add_argument(
        "--output",
        type=Path,
        help="where --wait writes the output file (default: INPUT.output.jsonl beside the "
        "input, or BATCH_ID.output.jsonl); the error file goes beside it as NAME.errors.jsonl",
    )

    command = command_group(
        sub,
        "batch",
        help="OpenAI-compatible batches over the API",
        description=__doc__.split("\n\n", 1)[0],
        epilog="exit status: 0 all lines succeeded; 1 validation failed or some line did "
        "not succeed; 2 usage or HTTP error; 130 waiting stopped by Ctrl-C",
    )

    new = command("submit", submit, "upload a JSONL file and create a batch of it", waiting)
    new.add_argument("file", type=Path, help="JSONL: custom_id, method, url, body per line")
    new.add_argument("--model", help="for the lines whose body names no model")
    new.add_argument("--window", default="24h", help="completion window (default: %(default)s)")
    new.add_argument(
        "--metadata",
        type=pair,
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        default=[],
        help="kept with the batch (up to 16 pairs)",
    )
    new.add_argument("--webhook-url", help="told when the batch ends")
    listing = command("list", list_batches, "the newest batches")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (1-100)")
    listing.add_argument("--after", help="the last id of the previous page")
    command("status", status, "one batch; --wait follows it", waiting).add_argument("id")
    command("cancel", cancel, "cancel a running batch").add_argument("id")
    again = command(
        "retry", retry, "a new batch of the lines that failed, expired or were cancelled", waiting
    )
    again.add_argument("id")
    read = command("results", results, "the lines finished so far, as JSONL (stdout)")
    read.add_argument("id")
    read.add_argument("--after", metavar="LINE_ID", help="only lines that ended after this one")
    read.add_argument("--output", type=Path, help="a file instead of stdout")
