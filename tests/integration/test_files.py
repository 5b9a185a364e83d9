"""The Files API as the official OpenAI SDK drives it, against the real API process; the
storage backends and limits in-process, on the session's Postgres."""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update

from api.app import create_app
from chatjobs import files
from chatjobs.batches import output
from chatjobs.db import session_scope
from chatjobs.errors import FileTooLarge
from chatjobs.models import StoredFile
from chatjobs.settings import get_settings
from tests.conftest import MiniStack, new_key
from tests.integration.test_limits import read_response

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]

LINE = b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def sdk(api_url: str, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, **{"max_retries": 0, **options})


@pytest.fixture
def client(api_url: str, api_key: str) -> Iterator[openai.OpenAI]:
    with sdk(api_url, api_key) as c:
        yield c


def large_objects() -> int:
    with session_scope() as session:
        return int(session.scalar(text("SELECT count(*) FROM pg_largeobject_metadata")) or 0)


def tenant_of(file_id: str) -> uuid.UUID:
    with session_scope() as session:
        return session.scalars(select(StoredFile.tenant_id).where(StoredFile.id == file_id)).one()


# --- the SDK's calls --------------------------------------------------------------------------


def test_an_upload_comes_back_processed_with_its_size(client: openai.OpenAI) -> None:
    created = client.files.create(file=("input.jsonl", LINE * 3), purpose="batch")
    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename) == (
        "file",
        3 * len(LINE),
        "input.jsonl",
    )
    assert (created.purpose, created.status, created.status_details) == ("batch", "processed", None)
    # A batch input expires after 30 days unless asked otherwise.
    assert created.expires_at == created.created_at + 30 * 86400
    assert abs(created.created_at - time.time()) < 60
    started = time.monotonic()
    assert client.files.wait_for_processing(created.id) == created
    assert time.monotonic() - started < 1
    assert client.files.retrieve(created.id) == created


def test_other_purposes_are_kept_until_deleted_unless_they_expire(client: openai.OpenAI) -> None:
    kept = client.files.create(file=("notes.txt", b"hi"), purpose="user_data")
    assert (kept.purpose, kept.expires_at) == ("user_data", None)
    timed = client.files.create(
        file=("notes.txt", b"hi"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert timed.expires_at == timed.created_at + 3600


def test_list_pages_through_every_file_in_either_order(client: openai.OpenAI) -> None:
    made = [client.files.create(file=(f"{i}.jsonl", LINE), purpose="batch").id for i in range(5)]
    other = client.files.create(file=("notes.txt", b"x"), purpose="user_data").id
    newest_first = [f.id for f in client.files.list(limit=2)]
    assert newest_first == [other, *reversed(made)]
    assert [f.id for f in client.files.list(limit=2, order="asc")] == [*made, other]
    assert [f.id for f in client.files.list(purpose="batch", limit=3)] == made[::-1]
    page = client.files.list(limit=2)
    pages = list(page.iter_pages())  # the first included
    assert [len(p.data) for p in pages] == [2, 2, 2]
    assert [p.has_more for p in pages] == [True, True, False]
    raw = client.files.with_raw_response.list(limit=2, order="asc").http_response.json()
    assert (raw["object"], raw["first_id"], raw["last_id"]) == ("list", made[0], made[1])


def test_content_round_trips_byte_for_byte(client: openai.OpenAI) -> None:
    data = random.Random(7).randbytes(6 * 1024 * 1024 + 3)  # several storage chunks and a bit
    created = client.files.create(file=("big.bin", data), purpose="user_data")
    assert created.bytes == len(data)
    response = client.files.with_raw_response.content(created.id)
    assert response.http_response.headers["content-length"] == str(len(data))
    assert response.http_response.headers["content-type"] == "application/octet-stream"
    assert response.parse().content == data
    empty = client.files.create(file=("empty.jsonl", b""), purpose="batch")
    assert (empty.bytes, client.files.content(empty.id).content) == (0, b"")


def test_a_deleted_file_is_gone_with_its_content(client: openai.OpenAI) -> None:
    created = client.files.create(file=("input.jsonl", LINE), purpose="batch")
    before = large_objects()
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert large_objects() == before - 1
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as missing:
            call(created.id)
        assert missing.value.body["type"] == "not_found"  # type: ignore[index]
    assert created.id not in [f.id for f in client.files.list()]


def test_another_tenants_file_is_a_404(client: openai.OpenAI, api_url: str) -> None:
    created = client.files.create(file=("input.jsonl", LINE), purpose="batch")
    with sdk(api_url, new_key()) as stranger:
        for call in (stranger.files.retrieve, stranger.files.content, stranger.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(created.id)
        assert list(stranger.files.list()) == []
    assert client.files.retrieve(created.id).id == created.id


def test_the_same_idempotency_key_and_upload_give_the_first_file(client: openai.OpenAI) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.files.with_raw_response.create(
        file=("in.jsonl", LINE), purpose="batch", extra_headers=key
    )
    assert "idempotent-replayed" not in first.http_response.headers
    before = large_objects()
    again = client.files.with_raw_response.create(
        file=("in.jsonl", LINE), purpose="batch", extra_headers=key
    )
    assert again.http_response.headers["idempotent-replayed"] == "true"
    assert again.parse() == first.parse()
    assert large_objects() == before  # nothing stored for the replay
    assert [f.id for f in client.files.list()] == [first.parse().id]


def test_a_reused_idempotency_key_is_a_409_the_sdk_does_not_resend(
    api_url: str, api_key: str
) -> None:
    sent: list[httpx2.Request] = []
    http = httpx2.Client(event_hooks={"request": [sent.append]})
    with sdk(api_url, api_key, max_retries=2, http_client=http) as client:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        client.files.create(file=("in.jsonl", LINE), purpose="batch", extra_headers=key)
        before = large_objects()
        for other in [{"file": ("in.jsonl", LINE * 2)}, {"file": ("other.jsonl", LINE)}]:
            sent.clear()
            with pytest.raises(openai.ConflictError) as conflict:
                client.files.create(**other, purpose="batch", extra_headers=key)  # type: ignore[arg-type]
            assert len(sent) == 1  # max_retries=2, yet sent once
            assert conflict.value.response.headers["x-should-retry"] == "false"
            assert "Idempotency-Key" in conflict.value.message
        assert large_objects() == before


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"purpose": "batch_output"}, "purpose"),
        ({"purpose": "nonsense"}, "purpose"),
        (
            {"purpose": "batch", "expires_after": {"anchor": "created_at", "seconds": 60}},
            "expires_after[seconds]",
        ),
        (
            {"purpose": "batch", "expires_after": {"anchor": "created_at", "seconds": 2_592_001}},
            "expires_after[seconds]",
        ),
        (
            {"purpose": "batch", "expires_after": {"anchor": "last_active_at", "seconds": 3600}},
            "expires_after[anchor]",
        ),
        ({"purpose": "batch", "file": ("", LINE)}, "file"),
    ],
)
def test_a_bad_upload_is_a_400_naming_the_field_and_not_resent(
    api_url: str, api_key: str, options: dict[str, Any], param: str
) -> None:
    sent: list[httpx2.Request] = []
    http = httpx2.Client(event_hooks={"request": [sent.append]})
    with sdk(api_url, api_key, max_retries=2, http_client=http) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(**{"file": ("in.jsonl", LINE), **options})
        assert refused.value.param == param
        assert refused.value.type == "invalid_request_error"
        assert refused.value.code is None
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert len(sent) == 1
        assert list(client.files.list()) == []


def test_a_form_without_file_or_purpose_is_a_400_naming_it(api_url: str, api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    with httpx2.Client(base_url=api_url, headers=auth) as http:
        no_file = http.post("/v1/files", data={"purpose": "batch"}, files={"x": ("a", b"1")})
        no_purpose = http.post("/v1/files", files={"file": ("a.jsonl", LINE)})
        not_a_form = http.post("/v1/files", json={"purpose": "batch"})
        # curl -F file=@in.jsonl -F purpose=batch: the file before the purpose is fine.
        file_first = http.post(
            "/v1/files",
            content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"'
            b"\r\n\r\n" + LINE + b'\r\n--b\r\nContent-Disposition: form-data; name="purpose"'
            b"\r\n\r\nbatch\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
    assert (no_file.status_code, no_file.json()["error"]["param"]) == (400, "x")
    assert (no_purpose.status_code, no_purpose.json()["error"]["param"]) == (400, "purpose")
    assert not_a_form.status_code == 400
    assert "multipart/form-data" in not_a_form.json()["error"]["message"]
    assert file_first.status_code == 200, file_first.text
    assert file_first.json()["bytes"] == len(LINE)


def test_a_strictly_validating_client_accepts_every_answer(api_url: str, api_key: str) -> None:
    with sdk(api_url, api_key, _strict_response_validation=True) as client:
        created = client.files.create(
            file=("in.jsonl", LINE),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 7200},
        )
        assert client.files.retrieve(created.id) == created
        assert [f.id for f in client.files.list(limit=1)] == [created.id]
        assert client.files.content(created.id).content == LINE
        assert client.files.delete(created.id).deleted is True


# --- in-process: limits and backends ----------------------------------------------------------


@pytest.fixture
def small_uploads(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("CHATJOBS_MAX_UPLOAD_BYTES", "4096")
    get_settings.cache_clear()
    yield 4096
    monkeypatch.delenv("CHATJOBS_MAX_UPLOAD_BYTES")
    get_settings.cache_clear()


FORM_HEAD = (
    b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
)


def test_an_upload_past_the_limit_is_a_413_in_the_envelope(
    small_uploads: int, api_key: str
) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}

    def body() -> Iterator[bytes]:  # no Content-Length: only counting can stop it
        yield FORM_HEAD
        yield b"x" * (small_uploads + 1)
        yield b"\r\n--b--\r\n"

    with TestClient(create_app()) as http:
        exact = http.post(
            "/v1/files",
            headers=auth,
            files={"file": ("a", b"x" * small_uploads)},
            data={"purpose": "batch"},
        )
        over = http.post(
            "/v1/files",
            headers={**auth, "content-type": "multipart/form-data; boundary=b"},
            content=body(),
        )
    assert exact.status_code == 200, exact.text
    assert over.status_code == 413
    assert over.headers["x-should-retry"] == "false"
    error = over.json()["error"]
    assert (error["type"], error["param"]) == ("request_too_large", "file")
    assert "CHATJOBS_MAX_UPLOAD_BYTES" in error["message"]


def test_an_upload_past_the_limit_is_refused_before_it_is_all_sent(
    make_stack: Make, api_key: str
) -> None:
    stack = make_stack(env={"CHATJOBS_MAX_UPLOAD_BYTES": "4096"}, workers=[], beat=False)
    parts = urlsplit(stack.url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80)) as sock:
        head = (
            f"POST /v1/files HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {api_key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000\r\n\r\n"
        )
        # A tenth of the declared body: the answer cannot wait for the rest.
        sock.sendall(head.encode() + FORM_HEAD + b"x" * 20_000)
        status, headers, body = read_response(sock, timeout=10)
    assert status == 413
    assert headers["x-should-retry"] == "false"
    assert body["error"]["param"] == "file"


def test_an_upload_past_the_limit_stores_nothing(small_uploads: int, tenant: uuid.UUID) -> None:
    before = large_objects()
    with pytest.raises(FileTooLarge), session_scope() as session:
        files.store_upload(
            session,
            tenant_id=tenant,
            chunks=[b"x" * 4000, b"x" * 97],
            filename="a",
            purpose="batch",
            expires_after_seconds=None,
            idempotency_key=None,
        )
    assert large_objects() == before
    with session_scope() as session:
        assert session.scalar(select(func.count()).where(StoredFile.tenant_id == tenant)) == 0


def store(tenant: uuid.UUID, data: bytes, **options: Any) -> StoredFile:
    with session_scope() as session:
        row, _ = files.store_upload(
            session,
            tenant_id=tenant,
            chunks=(data[i : i + 65536] for i in range(0, len(data), 65536)),
            filename=options.pop("filename", "in.jsonl"),
            purpose=options.pop("purpose", "batch"),
            expires_after_seconds=options.pop("expires_after_seconds", None),
            idempotency_key=options.pop("idempotency_key", None),
        )
        return row


def expire(file_id: str) -> None:
    with session_scope() as session:
        session.execute(
            update(StoredFile)
            .where(StoredFile.id == file_id)
            .values(expires_at=func.now() - text("interval '1 second'"))
        )


def test_postgres_storage_keeps_content_with_its_row(tenant: uuid.UUID) -> None:
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    before = large_objects()
    row = store(tenant, data)
    assert (row.storage, row.bytes, large_objects()) == ("postgres", len(data), before + 1)
    assert b"".join(files.open_content(row)) == data
    # Content written in a transaction that rolls back is gone with it.
    with pytest.raises(RuntimeError), session_scope() as session:
        files.store_upload(
            session,
            tenant_id=tenant,
            chunks=[data],
            filename="a",
            purpose="batch",
            expires_after_seconds=None,
            idempotency_key=None,
        )
        raise RuntimeError("the request failed after the upload")
    assert large_objects() == before + 1
    expire(row.id)
    assert files.prune(batch=1) >= 1
    assert large_objects() == before


@pytest.fixture
def directory(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Path]:
    monkeypatch.setenv("CHATJOBS_FILE_STORAGE", "directory")
    monkeypatch.setenv("CHATJOBS_FILES_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    monkeypatch.delenv("CHATJOBS_FILE_STORAGE")
    monkeypatch.delenv("CHATJOBS_FILES_DIR")
    get_settings.cache_clear()


def stored_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_directory_storage_round_trips_and_follows_its_row(
    directory: Path, tenant: uuid.UUID
) -> None:
    data = random.Random(4).randbytes(2 * 1024 * 1024 + 5)
    row = store(tenant, data)
    assert row.storage == "directory" and row.location is not None
    assert stored_paths(directory) == [directory / row.location]
    assert not os.path.isabs(row.location)
    assert b"".join(files.open_content(row)) == data
    # A rolled-back upload leaves no file; a rolled-back delete keeps it.
    with pytest.raises(RuntimeError), session_scope() as session:
        files.store_upload(
            session,
            tenant_id=tenant,
            chunks=[b"doomed"],
            filename="a",
            purpose="batch",
            expires_after_seconds=None,
            idempotency_key=None,
        )
        raise RuntimeError("rolled back")
    with pytest.raises(RuntimeError), session_scope() as session:
        files.delete_file(session, tenant_id=tenant, file_id=row.id)
        raise RuntimeError("rolled back")
    assert stored_paths(directory) == [directory / row.location]
    with session_scope() as session:
        files.delete_file(session, tenant_id=tenant, file_id=row.id)
    assert stored_paths(directory) == []


def test_directory_storage_replays_and_prunes_without_leftovers(
    directory: Path, tenant: uuid.UUID
) -> None:
    first = store(tenant, b"abc", idempotency_key="k1")
    again = store(tenant, b"abc", idempotency_key="k1")
    assert again.id == first.id
    assert len(stored_paths(directory)) == 1
    expire(first.id)
    with session_scope() as session:
        files.prune_expired(session, 100)
        with pytest.raises(files.FileNotFound):
            files.get_file(session, tenant_id=tenant, file_id=first.id)
    assert stored_paths(directory) == []


def test_an_expired_file_is_hidden_before_it_is_pruned(tenant: uuid.UUID) -> None:
    row = store(tenant, LINE)
    expire(row.id)
    with session_scope() as session:
        with pytest.raises(files.FileNotFound):
            files.get_file(session, tenant_id=tenant, file_id=row.id)
        assert files.list_files(session, tenant_id=tenant) == ([], False)


def test_a_batch_file_reads_the_batchs_lines_and_keeps_no_content(
    tenant: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str]] = []

    def chunks(batch_id: str, kind: str) -> Iterator[bytes]:
        asked.append((batch_id, kind))
        yield b'{"custom_id": "a"}\n'
        yield b'{"custom_id": "b"}\n'

    monkeypatch.setattr(output, "chunks", chunks)
    with session_scope() as session:
        row = files.create_output_file(
            session,
            tenant_id=tenant,
            batch_id="batch_x",
            kind="error",
            bytes_=38,
            expires_at=None,
        )
    assert (row.purpose, row.filename, row.storage, row.bytes) == (
        "batch_output",
        "batch_x_error.jsonl",
        "batch",
        38,
    )
    assert b"".join(files.open_content(row)) == b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    assert asked == [("batch_x", "error")]
    before = large_objects()
    with session_scope() as session:
        files.delete_file(session, tenant_id=tenant, file_id=row.id)
        assert files.list_files(session, tenant_id=tenant) == ([], False)
    assert large_objects() == before
