"""The Files API's pure pieces: the multipart reader, the upload rules, the error envelope the
OpenAI SDK reads, and the body limits that let an upload through."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.types import Message

from api import errors, multipart
from api.limits import FORM_OVERHEAD_BYTES, BodySizeLimit
from api.routes.files import FileObject, upload_fields
from chatjobs import files
from chatjobs.errors import (
    FileNotFound,
    FileTooLarge,
    IdempotencyConflict,
    InvalidRequest,
)
from chatjobs.models import StoredFile

BOUNDARY = b"a1b2c3d4e5f6"


def encode(data: dict[str, str], file: tuple[str, bytes] | None) -> tuple[bytes, str]:
    """A body as the OpenAI SDK sends it (its transport's own multipart encoder)."""
    stream = httpx2._multipart.MultipartStream(
        data=data, files={"file": file} if file else {}, boundary=BOUNDARY
    )
    return b"".join(stream), stream.content_type


def parse(body: bytes, pieces: Iterator[int] | None = None) -> list[tuple[str, Any]]:
    """(name, filename) per part and its whole content, feeding ``body`` in the given sizes."""
    parser = multipart.Parser(BOUNDARY)
    parts: list[tuple[str, Any]] = []
    at = 0
    while at < len(body):
        size = next(pieces) if pieces else len(body)
        for event in parser.feed(body[at : at + size]):
            if isinstance(event, multipart.Part):
                parts.append(((event.name, event.filename), b""))
            else:
                parts[-1] = (parts[-1][0], parts[-1][1] + event)
        at += size
    parser.close()
    return parts


# --- the multipart reader ------------------------------------------------------------------


def test_the_sdks_body_parses_into_its_fields_and_file() -> None:
    # Near misses of the delimiter (CRLF, --, the boundary) are content.
    content = b"line one\r\n--a1b2c3d4e5f\r\n-a1b2c3d4e5f6 --a1b2c3d4e5f6\r\n" * 50
    body, _ = encode(
        {"purpose": "batch", "expires_after[anchor]": "created_at"}, ("in.jsonl", content)
    )
    assert parse(body) == [
        (("purpose", None), b"batch"),
        (("expires_after[anchor]", None), b"created_at"),
        (("file", "in.jsonl"), content),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_a_body_split_anywhere_parses_the_same(seed: int) -> None:
    rng = random.Random(seed)
    content = rng.randbytes(20_000) + b"\r\n--" + BOUNDARY[:-1]
    body, _ = encode({"purpose": "batch"}, ("x.bin", content))
    sizes = iter(lambda: rng.choice([1, 2, 3, 7, 15, 64, 1000]), None)
    assert parse(body, sizes) == parse(body)
    assert parse(body)[1][1] == content


def test_a_body_fed_one_byte_at_a_time_parses() -> None:
    body, _ = encode({"purpose": "user_data"}, ("a.txt", b"hello"))
    assert parse(body, iter(lambda: 1, None)) == [
        (("purpose", None), b"user_data"),
        (("file", "a.txt"), b"hello"),
    ]


def test_preamble_and_epilogue_are_ignored() -> None:
    body, _ = encode({"purpose": "batch"}, None)
    assert parse(b"preamble text\r\n" + body + b"epilogue") == [(("purpose", None), b"batch")]


@pytest.mark.parametrize(
    "filename", ['quote"d.jsonl', "back\\slash.jsonl", "ünïcödé €.jsonl", "semi;colon.jsonl"]
)
def test_filenames_come_back_as_the_sdk_sent_them(filename: str) -> None:
    body, _ = encode({}, (filename, b"x"))
    (((_, parsed), _),) = parse(body)
    # The SDK's encoder writes a quote as %22 (as browsers do); everything else is literal.
    assert parsed == filename.replace('"', "%22")


def test_an_rfc5987_filename_wins_over_the_plain_one() -> None:
    kind, params = multipart.parse_header(
        'form-data; name="file"; filename="plain.txt"; filename*=UTF-8\'\'%E2%82%AC%20rates.txt'
    )
    assert (kind, params["name"], params["filename"]) == ("form-data", "file", "€ rates.txt")


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "multipart/form-data", "multipart/form-data; boundary="],
)
def test_a_body_that_is_not_multipart_with_a_boundary_is_refused(content_type: str | None) -> None:
    with pytest.raises(InvalidRequest, match="multipart/form-data"):
        multipart.boundary(content_type)


def test_a_quoted_boundary_is_read() -> None:
    assert multipart.boundary('multipart/form-data; boundary="ab:c d"') == b"ab:c d"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'--a1b2c3d4e5f6\r\nContent-Disposition: form-data; name="x"\r\n\r\nv', "ended"),
        (b"--a1b2c3d4e5f6\r\nContent-Type: text/plain\r\n\r\nv\r\n--a1b2c3d4e5f6--", "name="),
        (b"--a1b2c3d4e5f6\r\nno colon here\r\n\r\nv\r\n--a1b2c3d4e5f6--", "colon"),
        (b"--a1b2c3d4e5f6XX", "CRLF or --"),
        (b"--a1b2c3d4e5f6\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", "headers exceed"),
        (b"", "ended"),
    ],
)
def test_a_malformed_body_is_an_invalid_request(body: bytes, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        parse(body)


def _request(body: bytes, content_type: str, piece: int = 65536) -> tuple[Request, list[int]]:
    """A request whose body arrives in pieces; the list counts the pieces read."""
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)] or [b""]
    read: list[int] = []

    async def receive() -> Message:
        read.append(1)
        chunk = pieces[len(read) - 1]
        return {"type": "http.request", "body": chunk, "more_body": len(read) < len(pieces)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/files",
        "headers": [(b"content-type", content_type.encode())],
    }
    return Request(scope, receive), read


def read_form(body: bytes, content_type: str, max_file_bytes: int = 10**9) -> multipart.Form:
    request, _ = _request(body, content_type)
    return asyncio.run(
        multipart.read_form(request, file_field="file", max_file_bytes=max_file_bytes)
    )


def test_a_form_keeps_its_fields_and_spools_its_file_in_any_order() -> None:
    content = random.Random(1).randbytes(3 * 1024 * 1024 + 5)
    stream = httpx2._multipart.MultipartStream(
        data={}, files=[("file", ("big.bin", content))], boundary=BOUNDARY
    )
    # The file first, its fields after it (as `curl -F file=@x -F purpose=batch` sends them).
    body = b"".join(stream).removesuffix(b"--a1b2c3d4e5f6--\r\n") + (
        b'--a1b2c3d4e5f6\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b"--a1b2c3d4e5f6--\r\n"
    )
    with read_form(body, stream.content_type) as form:
        assert form.fields == {"purpose": "batch"}
        assert form.file is not None
        assert (form.file.filename, form.file.size) == ("big.bin", len(content))
        assert form.file.content._rolled  # type: ignore[attr-defined]  # on disk, not in memory
        chunks = list(form.file.chunks())
    assert b"".join(chunks) == content
    assert max(len(c) for c in chunks) <= multipart.CHUNK_BYTES


def test_a_file_over_the_limit_is_refused_before_the_rest_is_read() -> None:
    body, content_type = encode({"purpose": "batch"}, ("x", b"x" * 1_000_000))
    request, read = _request(body, content_type, piece=10_000)
    with pytest.raises(FileTooLarge) as refused:
        asyncio.run(multipart.read_form(request, file_field="file", max_file_bytes=50_000))
    assert refused.value.param == "file"
    assert len(read) < 10  # of about 100 pieces


def test_a_client_gone_mid_upload_is_a_quiet_400() -> None:
    body, content_type = encode({"purpose": "batch"}, ("x", b"x" * 100_000))
    sent = iter([body[:50_000]])

    async def receive() -> Message:
        chunk = next(sent, None)
        if chunk is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = {"type": "http", "headers": [(b"content-type", content_type.encode())]}
    with pytest.raises(InvalidRequest, match="disconnected"):
        asyncio.run(
            multipart.read_form(Request(scope, receive), file_field="file", max_file_bytes=10**9)
        )


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ([("purpose", "batch"), ("purpose", "batch")], "purpose"),
        ([("purpose", "b" * 2000)], "purpose"),
    ],
)
def test_a_field_twice_or_too_long_is_refused_naming_it(
    data: list[tuple[str, str]], param: str
) -> None:
    body = b"".join(
        b'--a1b2c3d4e5f6\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (name.encode(), value.encode())
        for name, value in data
    )
    with pytest.raises(InvalidRequest) as refused:
        read_form(body + b"--a1b2c3d4e5f6--\r\n", "multipart/form-data; boundary=a1b2c3d4e5f6")
    assert refused.value.param == param


def test_two_files_are_refused() -> None:
    stream = httpx2._multipart.MultipartStream(
        data={}, files=[("file", ("a", b"1")), ("file", ("b", b"2"))], boundary=BOUNDARY
    )
    with pytest.raises(InvalidRequest, match="more than once"):
        read_form(b"".join(stream), stream.content_type)


def test_more_parts_than_allowed_are_refused() -> None:
    body, content_type = encode({f"f{i}": "v" for i in range(multipart.MAX_PARTS + 1)}, None)
    with pytest.raises(InvalidRequest, match="parts"):
        read_form(body, content_type)


# --- what the form asks for ------------------------------------------------------------------


def _form(fields: dict[str, str], filename: str | None = "in.jsonl") -> multipart.Form:
    return multipart.Form(fields, multipart.Upload(filename) if filename is not None else None)


def test_the_form_gives_purpose_and_expiry() -> None:
    fields = {
        "purpose": "batch",
        "expires_after[anchor]": "created_at",
        "expires_after[seconds]": "3600",
    }
    with _form(fields) as form:
        assert upload_fields(form) == ("batch", 3600)
    with _form({"purpose": "batch"}) as form:
        assert upload_fields(form) == ("batch", None)


@pytest.mark.parametrize(
    ("fields", "has_file", "param"),
    [
        ({"purpose": "batch"}, False, "file"),
        ({}, True, "purpose"),
        ({"purpose": "batch", "purpos": "x"}, True, "purpos"),
        ({"purpose": "batch", "expires_after[seconds]": "3600"}, True, "expires_after[anchor]"),
        ({"purpose": "batch", "expires_after[anchor]": "now"}, True, "expires_after[anchor]"),
        (
            {"purpose": "batch", "expires_after[anchor]": "created_at"},
            True,
            "expires_after[seconds]",
        ),
        (
            {
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "1e4",
            },
            True,
            "expires_after[seconds]",
        ),
        (
            {
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "٣٦٠٠",
            },
            True,
            "expires_after[seconds]",
        ),
    ],
)
def test_a_missing_or_bad_field_is_a_400_naming_it(
    fields: dict[str, str], has_file: bool, param: str
) -> None:
    with _form(fields, "x" if has_file else None) as form, pytest.raises(InvalidRequest) as refused:
        upload_fields(form)
    assert refused.value.param == param


@pytest.mark.parametrize(
    ("purpose", "filename", "seconds", "param"),
    [
        ("fine-tune-results", "a", None, "purpose"),
        ("batch_output", "a", None, "purpose"),
        ("batch", "", None, "file"),
        ("batch", "   ", None, "file"),
        ("batch", "a" * 513, None, "file"),
        ("batch", "a", 3599, "expires_after[seconds]"),
        ("batch", "a", 2_592_001, "expires_after[seconds]"),
    ],
)
def test_uploads_refused_by_the_rules(
    purpose: str, filename: str, seconds: int | None, param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        files.check_upload(purpose=purpose, filename=filename, expires_after_seconds=seconds)
    assert refused.value.param == param


@pytest.mark.parametrize("purpose", files.UPLOAD_PURPOSES)
@pytest.mark.parametrize("seconds", [None, 3600, 2_592_000])
def test_every_sdk_purpose_and_the_expiry_bounds_are_accepted(
    purpose: str, seconds: int | None
) -> None:
    files.check_upload(purpose=purpose, filename="a.jsonl", expires_after_seconds=seconds)


def test_the_idempotency_hash_covers_every_part_of_the_upload() -> None:
    base = {"purpose": "batch", "filename": "a", "expires_after_seconds": None, "sha256": "00"}
    variants = [
        {**base, "purpose": "user_data"},
        {**base, "filename": "b"},
        {**base, "expires_after_seconds": 3600},
        {**base, "sha256": "01"},
    ]
    hashes = {files.upload_hash(**v) for v in [base, *variants]}  # type: ignore[arg-type]
    assert len(hashes) == 5
    assert files.upload_hash(**base) == files.upload_hash(**dict(base))  # type: ignore[arg-type]


def test_measured_regroups_counts_and_hashes() -> None:
    pieces = [b"x" * 65536] * 40  # 2.5 MiB in 64 KiB pieces
    measured = files.Measured(pieces, limit=10**9)
    chunks = list(measured)
    assert b"".join(chunks) == b"".join(pieces)
    assert [len(c) for c in chunks] == [1024 * 1024, 1024 * 1024, 512 * 1024]
    assert measured.size == 40 * 65536
    assert measured.sha256 == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_measured_refuses_one_byte_past_the_limit_and_no_earlier() -> None:
    assert sum(map(len, files.Measured([b"ab", b"cd"], limit=4))) == 4
    with pytest.raises(FileTooLarge):
        list(files.Measured([b"ab", b"cd", b"e"], limit=4))


def test_a_file_object_has_the_sdks_shape() -> None:
    row = StoredFile(
        id="file-abc",
        purpose="batch",
        filename="in.jsonl",
        bytes=12,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        expires_at=datetime(2026, 1, 31, tzinfo=UTC),
    )
    assert FileObject.from_row(row).model_dump() == {
        "id": "file-abc",
        "object": "file",
        "bytes": 12,
        "created_at": 1767225600,
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": 1767225600 + 30 * 86400,
        "status_details": None,
    }


# --- the error envelope and x-should-retry --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "refuses_retry"),
    [
        *[(400, True), (404, True), (409, True), (413, True), (422, True)],
        *[(408, False), (429, False), (500, False), (503, False)],
    ],
)
def test_should_retry_is_false_on_every_4xx_but_408_and_429(
    status: int, refuses_retry: bool
) -> None:
    response = errors.error_json(status, errors.error_body("t", "m"))
    assert (response.headers.get("x-should-retry") == "false") is refuses_retry


def _raising(exc: Exception) -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.get("/raise")
    def raise_it() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("exc", "status", "type_", "param"),
    [
        (InvalidRequest("bad purpose", param="purpose"), 400, "invalid_request_error", "purpose"),
        (FileTooLarge("too big", param="file"), 413, "request_too_large", "file"),
        (FileNotFound("no file x"), 404, "not_found", None),
        (IdempotencyConflict("used"), 409, "conflict", None),
    ],
)
def test_errors_answer_openais_envelope_and_refuse_a_retry(
    exc: Exception, status: int, type_: str, param: str | None
) -> None:
    response = _raising(exc).get("/raise")
    assert response.status_code == status
    assert response.json() == {
        "error": {"message": str(exc), "type": type_, "param": param, "code": None}
    }
    assert response.headers["x-should-retry"] == "false"


def test_a_500_keeps_its_request_id_and_allows_a_retry() -> None:
    response = _raising(RuntimeError("bug")).get("/raise")
    error = response.json()["error"]
    assert response.status_code == 500
    assert (error["param"], error["code"], error["type"]) == (None, None, "internal_error")
    assert error["request_id"] and "x-should-retry" not in response.headers


# --- the body limits let an upload through ------------------------------------------------


def _limited(max_upload_bytes: int) -> TestClient:
    app = FastAPI()

    @app.post("/v1/files")
    @app.post("/v1/jobs")
    async def count(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    limited = BodySizeLimit(
        app,
        max_bytes=2048,
        large_bytes=1024,
        max_large=1,
        wait_seconds=0,
        max_upload_bytes=max_upload_bytes,
    )
    return TestClient(limited)  # type: ignore[arg-type]


def test_an_upload_is_not_held_to_the_body_limit() -> None:
    client = _limited(max_upload_bytes=100_000)
    assert client.post("/v1/files", content=b"x" * 50_000).json() == {"size": 50_000}
    refused = client.post("/v1/jobs", content=b"x" * 50_000)
    assert refused.status_code == 413 and "CHATJOBS_MAX_BODY_BYTES" in refused.text


def test_an_upload_declared_past_its_limit_is_refused_unread() -> None:
    client = _limited(max_upload_bytes=10_000)
    refused = client.post("/v1/files", content=b"x" * (10_000 + FORM_OVERHEAD_BYTES + 1))
    assert refused.status_code == 413
    assert refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert "CHATJOBS_MAX_UPLOAD_BYTES" in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("request_too_large", None, None)
