"""`chatjobs batch ...` against an in-memory fake of the batch API (an httpx transport).

The fake holds what the real server would: uploads (spooled to disk as they stream in),
the batch and the answers each Idempotency-Key made; a script of batch states stands in
for the lines running.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs import batch_cli
from chatjobs.cli import build_parser

API = "http://api.test"
BATCH_ID = "batch_0001"


def batch_object(status: str = "in_progress", **changes: Any) -> dict[str, Any]:
    counts = {"total": 10, "completed": 0, "failed": 0, "expired": 0, "cancelled": 0}
    counts.update({k: changes.pop(k) for k in list(changes) if k in counts})
    return {
        "id": BATCH_ID,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": 1_700_000_000,
        "expires_at": 1_700_086_400,
        "request_counts": {**counts, "in_progress": 0},
        "metadata": None,
        "model": None,
        **changes,
    }


class FakeServer(httpx.BaseTransport):
    """Files, one batch and idempotent POSTs, as the chatjobs API answers them."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.sent: list[httpx.Request] = []
        self.made: dict[str, tuple[int, bytes]] = {}  # Idempotency-Key -> the first answer
        self.uploads: list[tuple[str, Path]] = []  # (content-type, raw multipart body)
        self.created: list[dict[str, Any]] = []  # bodies of the batches made
        self.script: list[dict[str, Any]] = []  # what GET /v1/batches/{id} answers, in turn
        self.contents: dict[str, bytes] = {}
        self.lose_first: set[str] = set()  # "POST /v1/files": do it, then time out the first
        self.canned: dict[str, list[httpx.Response]] = {}  # "GET /path": answers given first

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        route = f"{request.method} {request.url.path}"
        if self.canned.get(route):
            return self.canned[route].pop(0)
        key = request.headers.get("idempotency-key")
        if key is not None and key in self.made:
            status, content = self.made[key]
            return httpx.Response(status, content=content, headers={"Idempotent-Replayed": "true"})
        response = self._answer(request, route)
        if key is not None:
            self.made[key] = (response.status_code, response.content)
        if route in self.lose_first:
            self.lose_first.discard(route)
            raise httpx.ReadTimeout("timed out", request=request)
        return response

    def _answer(self, request: httpx.Request, route: str) -> httpx.Response:
        if route == "POST /v1/files":
            return self._upload(request)
        if route == "POST /v1/batches":
            self.created.append(json.loads(request.read()))
            return httpx.Response(200, json=batch_object("validating", total=0))
        if route == f"GET /v1/batches/{BATCH_ID}":
            return httpx.Response(
                200, json=self.script.pop(0) if self.script[1:] else self.script[0]
            )
        if match := re.fullmatch(r"GET /v1/files/([^/]+)/content", route):
            return httpx.Response(200, content=self.contents[match[1]])
        return httpx.Response(404, json={"error": {"message": f"no route {route}", "param": None}})

    def _upload(self, request: httpx.Request) -> httpx.Response:
        raw = self.spool / f"upload-{len(self.uploads)}"
        lines = 0
        with raw.open("wb") as out:  # as it streams in, never whole in memory
            assert isinstance(request.stream, httpx.SyncByteStream)
            for chunk in request.stream:
                out.write(chunk)
                lines += chunk.count(b"\n")
        self.uploads.append((request.headers["content-type"], raw))
        return httpx.Response(200, json={"id": f"file-{len(self.uploads)}", "object": "file"})

    def form(self, index: int = 0) -> dict[str, tuple[str | None, bytes]]:
        """The fields of an upload: name -> (filename, content)."""
        content_type, raw = self.uploads[index]
        boundary = content_type.split("boundary=")[1].encode()
        fields = {}
        for part in raw.read_bytes().split(b"--" + boundary)[1:-1]:
            head, _, body = part.partition(b"\r\n\r\n")
            name = re.search(rb'name="([^"]+)"', head)
            filename = re.search(rb'filename="([^"]+)"', head)
            assert name is not None
            fields[name[1].decode()] = (
                filename[1].decode() if filename else None,
                body.removesuffix(b"\r\n"),
            )
        return fields

    def sent_to(self, route: str) -> list[httpx.Request]:
        return [r for r in self.sent if f"{r.method} {r.url.path}" == route]


class Sleeps:
    """The CLI's sleep: records the pauses; raises KeyboardInterrupt at call ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.pauses: list[float] = []
        self.interrupt_at = interrupt_at

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        if len(self.pauses) == self.interrupt_at:
            raise KeyboardInterrupt


@pytest.fixture
def server(tmp_path: Path) -> FakeServer:
    spool = tmp_path / "spool"
    spool.mkdir()
    return FakeServer(spool)


def cli(server: FakeServer, *args: str, sleeps: Sleeps | None = None) -> int:
    command, *rest = args
    ns = build_parser().parse_args(
        ["batch", command, "--api-url", API, "--api-key", "cj_test", *rest]
    )
    return batch_cli.run(ns, transport=server, sleep=sleeps or Sleeps())


def request_line(custom_id: str, **body: Any) -> bytes:
    row = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    row["body"] = {"messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps(row).encode() + b"\n"


def input_file(tmp_path: Path, lines: int = 3) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_bytes(b"".join(request_line(f"q{i}", model="gpt-4.1") for i in range(lines)))
    return path


def ended(status: str = "completed", **changes: Any) -> dict[str, Any]:
    return batch_object(status, **changes)


def test_submit_uploads_the_file_as_is_and_creates_the_batch(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = input_file(tmp_path)
    code = cli(
        server,
        "submit",
        str(path),
        "--window",
        "1h",
        "--metadata",
        "team=search",
        "run=7",
        "--webhook-url",
        "https://hooks.example/batch",
    )
    assert code == 0
    assert capsys.readouterr().out == f"{BATCH_ID}\n"
    form = server.form()
    assert form["file"] == ("questions.jsonl", path.read_bytes())
    assert form["purpose"] == (None, b"batch")
    assert server.created == [
        {
            "input_file_id": "file-1",
            "endpoint": "/v1/chat/completions",
            "completion_window": "1h",
            "metadata": {"team": "search", "run": "7"},
            "webhook_url": "https://hooks.example/batch",
        }
    ]
    file_key, batch_key = (r.headers["idempotency-key"] for r in server.sent)
    assert file_key != batch_key
    assert all(r.headers["authorization"] == "Bearer cj_test" for r in server.sent)


def test_model_fills_in_only_the_lines_whose_body_names_none(
    server: FakeServer, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.jsonl"
    named, unnamed, null = (
        request_line("named", model="gpt-4o"),
        request_line("unnamed"),
        request_line("null", model=None),
    )
    original = named + unnamed + null + b"not json\n" + b"\n" + b"[1, 2]\r\n"
    path.write_bytes(original)
    assert cli(server, "submit", str(path), "--model", "gpt-4.1-mini") == 0
    assert path.read_bytes() == original
    _, uploaded = server.form()["file"]
    lines = uploaded.splitlines(keepends=True)
    assert len(lines) == 6
    assert lines[0] == named
    assert json.loads(lines[1])["body"]["model"] == "gpt-4.1-mini"
    assert json.loads(lines[2])["body"]["model"] == "gpt-4.1-mini"
    assert lines[3:] == [b"not json\n", b"\n", b"[1, 2]\r\n"]


def test_a_file_is_uploaded_streamed_with_or_without_model(
    server: FakeServer, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    padding = "x" * 1000
    with path.open("wb") as out:
        for i in range(20_000):  # 20 MB
            out.write(request_line(f"q{i}", user=padding))
    size = path.stat().st_size
    # Warm up: the first client imports modules and reads the CA bundle (megabytes).
    assert cli(server, "submit", str(input_file(tmp_path)), "--model", "gpt-4.1") == 0
    for extra in ([], ["--model", "gpt-4.1"]):
        tracemalloc.start()
        try:
            assert cli(server, "submit", str(path), *extra) == 0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size / 10, (extra, peak)
    assert server.uploads[2][1].stat().st_size > size  # every line gained its model


def test_wait_shows_progress_then_writes_output_and_errors_beside_the_input(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = input_file(tmp_path)
    server.script = [
        batch_object("in_progress", completed=4, failed=1),
        ended(completed=9, failed=1, output_file_id="file-out", error_file_id="file-err"),
    ]
    server.contents = {"file-out": b'{"custom_id": "q0"}\n' * 9, "file-err": b'{"q": 9}\n'}
    sleeps = Sleeps()
    assert cli(server, "submit", str(path), "--wait", sleeps=sleeps) == 1
    assert (tmp_path / "questions.output.jsonl").read_bytes() == server.contents["file-out"]
    assert (tmp_path / "questions.errors.jsonl").read_bytes() == server.contents["file-err"]
    assert sleeps.pauses == [1.0, 1.0]
    err = capsys.readouterr().err
    assert "9 succeeded, 1 failed" in err
    assert f"chatjobs batch retry {BATCH_ID}" in err
    assert not list(tmp_path.glob("*.part"))


def test_a_batch_that_all_succeeded_exits_0_with_no_error_file(
    server: FakeServer, tmp_path: Path
) -> None:
    path = input_file(tmp_path)
    server.script = [ended(completed=10, output_file_id="file-out")]
    server.contents = {"file-out": b"{}\n" * 10}
    out = tmp_path / "elsewhere" / "answers.jsonl"
    out.parent.mkdir()
    assert cli(server, "submit", str(path), "--wait", "--output", str(out)) == 0
    assert out.read_bytes() == b"{}\n" * 10
    assert sorted(p.name for p in tmp_path.rglob("*.jsonl")) == [
        "answers.jsonl",
        "questions.jsonl",
    ]


def test_a_batch_whose_every_line_failed_writes_only_the_errors_file(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = input_file(tmp_path)
    server.script = [ended(total=3, failed=3, output_file_id=None, error_file_id="file-err")]
    server.contents = {"file-err": b"{}\n" * 3}
    assert cli(server, "submit", str(path), "--wait") == 1
    assert not (tmp_path / "questions.output.jsonl").exists()
    assert (tmp_path / "questions.errors.jsonl").read_bytes() == b"{}\n" * 3
    assert "0 succeeded, 3 failed" in capsys.readouterr().err


def test_a_batch_failing_validation_prints_its_errors_by_line_and_exits_1(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = input_file(tmp_path)
    errors = [
        {"code": "invalid_json", "line": 2, "message": "line 2 is not JSON", "param": None},
        {"code": "duplicate_custom_id", "line": 5, "message": "q0 again", "param": "custom_id"},
    ]
    server.script = [ended("failed", total=0, errors={"object": "list", "data": errors})]
    assert cli(server, "submit", str(path), "--wait") == 1
    err = capsys.readouterr().err
    assert "line 2: invalid_json: line 2 is not JSON" in err
    assert "line 5: duplicate_custom_id: q0 again" in err
    assert not list(tmp_path.glob("questions.*.jsonl"))


def test_a_post_resent_after_a_timeout_sends_the_same_key_and_makes_one_of_each(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = input_file(tmp_path)
    server.lose_first = {"POST /v1/files", "POST /v1/batches"}
    assert cli(server, "submit", str(path), "--model", "gpt-4.1") == 0
    for route in ("POST /v1/files", "POST /v1/batches"):
        first, second = server.sent_to(route)
        assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert len(server.uploads) == 1 and len(server.created) == 1
    assert capsys.readouterr().out == f"{BATCH_ID}\n"
    # A second invocation is another submission: new keys.
    assert cli(server, "submit", str(path)) == 0
    keys = {r.headers["idempotency-key"] for r in server.sent_to("POST /v1/files")}
    assert len(keys) == 2 and len(server.created) == 2


def test_ctrl_c_while_waiting_stops_waiting_and_says_how_to_resume(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = input_file(tmp_path)
    server.script = [batch_object("in_progress", completed=2)]
    assert cli(server, "submit", str(path), "--wait", sleeps=Sleeps(interrupt_at=3)) == 130
    err = capsys.readouterr().err
    output = tmp_path / "questions.output.jsonl"
    assert f"chatjobs batch status {BATCH_ID} --wait --output {output}" in err
    assert not output.exists()
    assert not [r for r in server.sent if r.url.path.endswith("/cancel")]


def test_status_wait_resumes_and_downloads(server: FakeServer, tmp_path: Path) -> None:
    server.script = [batch_object(completed=5), ended(completed=10, output_file_id="file-out")]
    server.contents = {"file-out": b"{}\n" * 10}
    out = tmp_path / "q.output.jsonl"
    assert cli(server, "status", BATCH_ID, "--wait", "--output", str(out)) == 0
    assert out.read_bytes() == b"{}\n" * 10


def test_polling_waits_as_retry_after_says_and_goes_on(server: FakeServer, tmp_path: Path) -> None:
    busy = {"error": {"message": "slow down", "type": "rate_limit_exceeded", "param": None}}
    server.canned[f"GET /v1/batches/{BATCH_ID}"] = [
        httpx.Response(429, json=busy, headers={"retry-after": "7"}),
        httpx.Response(503, json=busy, headers={"retry-after": "3"}),
    ]
    server.script = [ended(completed=10, output_file_id="file-out")]
    server.contents = {"file-out": b"{}\n" * 10}
    sleeps = Sleeps()
    assert (
        cli(server, "status", BATCH_ID, "--wait", "--output", str(tmp_path / "o"), sleeps=sleeps)
        == 0
    )
    assert sleeps.pauses == [7.0, 3.0]


def test_an_error_answer_prints_its_message_and_param_and_exits_2(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.canned["POST /v1/batches"] = [
        httpx.Response(
            400,
            json={
                "error": {
                    "message": "completion_window must be like 24h",
                    "type": "invalid_request_error",
                    "param": "completion_window",
                    "code": None,
                }
            },
        )
    ]
    assert cli(server, "submit", str(input_file(tmp_path)), "--window", "soon") == 2
    captured = capsys.readouterr()
    assert captured.err == "error: completion_window must be like 24h (completion_window)\n"
    assert captured.out == ""


def test_an_answer_outside_the_envelope_and_an_unreachable_api_exit_2(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.canned["GET /v1/batches/batch_x"] = [httpx.Response(500, text="<html>oops")]
    assert cli(server, "status", "batch_x") == 2
    assert capsys.readouterr().err == "error: HTTP 500: <html>oops\n"

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    ns = build_parser().parse_args(["batch", "list", "--api-url", API])
    sleeps = Sleeps()
    assert batch_cli.run(ns, transport=httpx.MockTransport(down), sleep=sleeps) == 2
    assert "error: no answer from http://api.test/v1/batches" in capsys.readouterr().err
    assert len(sleeps.pauses) == batch_cli.ATTEMPTS - 1


def test_list_shows_a_table_and_the_next_page(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    page = {
        "object": "list",
        "data": [batch_object(completed=2, failed=1), ended(completed=10)],
        "first_id": BATCH_ID,
        "last_id": BATCH_ID,
        "has_more": True,
    }
    server.canned["GET /v1/batches"] = [httpx.Response(200, json=page)]
    assert cli(server, "list", "--limit", "2") == 0
    (request,) = server.sent
    assert request.url.params["limit"] == "2" and "after" not in request.url.params
    captured = capsys.readouterr()
    assert BATCH_ID in captured.out and "3/10" in captured.out and "10/10" in captured.out
    assert f"chatjobs batch list --after {BATCH_ID}" in captured.err


def test_results_stream_to_stdout_after_a_line(
    server: FakeServer, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    lines = b'{"id": "batch_req_2"}\n{"id": "batch_req_3"}\n'
    server.canned[f"GET /v1/batches/{BATCH_ID}/results"] = [httpx.Response(200, content=lines)]
    assert cli(server, "results", BATCH_ID, "--after", "batch_req_1") == 0
    assert capsysbinary.readouterr().out == lines
    assert server.sent[0].url.params["after"] == "batch_req_1"


def test_results_from_the_start_into_a_file_through_an_openai_style_url(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = b'{"id": "batch_req_1"}\n'
    server.canned[f"GET /v1/batches/{BATCH_ID}/results"] = [httpx.Response(200, content=lines)]
    out = tmp_path / "so-far.jsonl"
    ns = build_parser().parse_args(
        ["batch", "results", BATCH_ID, "--output", str(out), "--api-url", f"{API}/v1/"]
    )
    assert batch_cli.run(ns, transport=server, sleep=Sleeps()) == 0
    assert out.read_bytes() == lines
    assert str(server.sent[0].url) == f"{API}/v1/batches/{BATCH_ID}/results"
    assert capsys.readouterr().err == f"{out}: 1 line\n"


def test_cancel_and_retry(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.canned[f"POST /v1/batches/{BATCH_ID}/cancel"] = [
        httpx.Response(200, json=ended("cancelled", completed=3, failed=7, cancelled=7))
    ]
    server.canned[f"POST /v1/batches/{BATCH_ID}/retry"] = [
        httpx.Response(200, json={**batch_object("validating"), "id": "batch_0002"})
    ]
    assert cli(server, "cancel", BATCH_ID) == 0
    assert "cancelled: 3 succeeded, 7 failed (7 cancelled)" in capsys.readouterr().err
    assert cli(server, "retry", BATCH_ID) == 0
    assert capsys.readouterr().out == "batch_0002\n"
    assert "idempotency-key" in server.sent[-1].headers


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["batch", "submit", "f.jsonl", "--metadata", "novalue"])
    assert exit_.value.code == 2
    assert "'novalue' is not key=value" in capsys.readouterr().err
