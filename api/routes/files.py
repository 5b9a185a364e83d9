"""/v1/files: OpenAI's Files API (upload, list, read, download, delete), as its SDK calls it."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api import multipart
from api.deps import CallerDep, TenantDep
from api.openapi import FILE_CONTENT, UPLOAD_FORM, V1_ERRORS, errors
from chatjobs import files
from chatjobs.db import session_scope
from chatjobs.errors import InvalidRequest
from chatjobs.models import StoredFile
from chatjobs.settings import get_settings

router = APIRouter(prefix="/v1/files", tags=["files"], responses=V1_ERRORS)

Purpose = Literal["assistants", "batch", "batch_output", "fine-tune", "vision", "user_data"]


class FileObject(BaseModel):
    """A file, as OpenAI's SDK reads it (``status`` is always ``processed``)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["processed"] = "processed"
    expires_at: int | None
    status_details: None = None

    @classmethod
    def from_row(cls, row: StoredFile) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,  # only chatjobs.files writes it: one of Purpose
            expires_at=int(row.expires_at.timestamp()) if row.expires_at else None,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")


def upload_fields(form: multipart.Form) -> tuple[str, int | None]:
    """The purpose and expiry a form asks for; InvalidRequest naming the field at fault."""
    for name in form.fields:
        if name not in _FIELDS:
            raise InvalidRequest(
                f"unknown field {name}; the form takes file, {', '.join(_FIELDS)}", param=name
            )
    if form.file is None:
        raise InvalidRequest("file is required: a part named file, with a filename", param="file")
    purpose = form.fields.get("purpose")
    if purpose is None:
        raise InvalidRequest("purpose is required", param="purpose")
    anchor = form.fields.get("expires_after[anchor]")
    seconds = form.fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return purpose, None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be created_at", param="expires_after[anchor]"
        )
    if seconds is None or not re.fullmatch(r"[0-9]{1,10}", seconds):
        raise InvalidRequest(
            "expires_after[seconds] must be a whole number of seconds",
            param="expires_after[seconds]",
        )
    return purpose, int(seconds)


def _store(tenant_id: uuid.UUID, form: multipart.Form, key: str | None) -> tuple[FileObject, bool]:
    purpose, seconds = upload_fields(form)
    assert form.file is not None  # upload_fields says so
    with session_scope() as session:
        row, created = files.store_upload(
            session,
            tenant_id=tenant_id,
            chunks=form.file.chunks(),
            filename=form.file.filename or "",
            purpose=purpose,
            expires_after_seconds=seconds,
            idempotency_key=key,
        )
        return FileObject.from_row(row), created


@router.post(
    "",
    response_model=FileObject,
    responses=errors(
        400,
        409,
        413,
        described={
            400: "The form is malformed, or a field is missing or invalid "
            "(`invalid_request_error`; `param` names it).",
            409: "The Idempotency-Key was used before for a different upload (`conflict`).",
            413: "The file exceeds CHATJOBS_MAX_UPLOAD_BYTES (`request_too_large`).",
        },
    ),
    openapi_extra=UPLOAD_FORM,
)
async def create_file(
    request: Request,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FileObject:
    """Upload a file (multipart/form-data: `file`, `purpose`, optionally `expires_after[anchor]`
    and `expires_after[seconds]`).

    The same Idempotency-Key with the same upload returns the first file (header
    `Idempotent-Replayed: true`); with a different one, 409.
    """
    limit = get_settings().max_upload_bytes
    with await multipart.read_form(request, file_field="file", max_file_bytes=limit) as form:
        stored, created = await run_in_threadpool(_store, caller.tenant_id, form, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return stored


# A query value with NUL is refused before any route (api/request_id.py): the document says so.
_NO_NUL = r"^[^\x00]*$"


@router.get("", response_model=FileList)
def list_files(
    tenant_id: TenantDep,
    after: Annotated[
        str | None,
        Query(max_length=64, pattern=_NO_NUL, description="last id of the previous page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=32, pattern=_NO_NUL)] = None,
) -> FileList:
    """The tenant's files by creation (newest first unless `order=asc`), with cursor
    pagination."""
    with session_scope() as session:
        rows, has_more = files.list_files(
            session, tenant_id=tenant_id, after=after, limit=limit, order=order, purpose=purpose
        )
        data = [FileObject.from_row(row) for row in rows]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{file_id}", response_model=FileObject, responses=errors(404))
def get_file(file_id: str, tenant_id: TenantDep) -> FileObject:
    """One file."""
    with session_scope() as session:
        return FileObject.from_row(files.get_file(session, tenant_id=tenant_id, file_id=file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={**FILE_CONTENT, **errors(404)},
)
def file_content(file_id: str, tenant_id: TenantDep) -> StreamingResponse:
    """The file's bytes, streamed."""
    return content_response(tenant_id, file_id)


def content_response(tenant_id: uuid.UUID, file_id: str) -> StreamingResponse:
    """The tenant's file as a download (``attachment``, streamed): this route's answer, and
    the console's downloads of a batch's files. FileNotFound as ``files.get_file``."""
    with session_scope() as session:
        row = files.get_file(session, tenant_id=tenant_id, file_id=file_id)
    headers = {"content-disposition": f"attachment; filename*=utf-8''{quote(row.filename)}"}
    if row.storage != "batch":  # a batch file's lines are produced as it is read
        headers["content-length"] = str(row.bytes)
    return StreamingResponse(
        files.open_content(row), media_type="application/octet-stream", headers=headers
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=errors(404))
def delete_file(file_id: str, tenant_id: TenantDep) -> FileDeleted:
    """Delete a file and its content."""
    with session_scope() as session:
        files.delete_file(session, tenant_id=tenant_id, file_id=file_id)
    return FileDeleted(id=file_id)
