"""The OpenAI Files API's store: the only writer of ``files`` rows and of their content.

An upload's content goes to one of two backends, chosen by CHATJOBS_FILE_STORAGE; a file is
always read from the backend it was written to (its row says which), so a deployment can
switch without moving old files.

- ``postgres``, the default: one large object per file, written in ~1 MiB pieces
  (``lo_from_bytea`` then ``lo_put``) and read the same way (``lo_get``). There is one thing to
  back up; the content commits or rolls back with its row, so a failed or replayed upload
  leaves nothing behind; and the API and worker hosts read it over the connections they
  already have, with no shared volume.
- ``directory``: a file under CHATJOBS_FILES_DIR (written under a temporary name, fsynced,
  renamed), for volumes too large to want in the database. Every API and worker host must
  mount the same directory. A file outside the database cannot join a transaction, so it
  follows its row's through session hooks: removed if the upload rolls back, unlinked only
  once a delete commits. (A crash between a commit and the hook can leave an orphan file
  behind, never a row without its file.)

A batch's output and error files (storage ``batch``) have no content of their own: their
lines are read from the batch's jobs by ``chatjobs.batches.output`` when they are downloaded.

Content moves through in ~1 MiB chunks both ways: memory never grows with a file's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

from sqlalchemy import ColumnElement, delete, event, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs.db import session_scope
from chatjobs.errors import FileNotFound, FileTooLarge, IdempotencyConflict, InvalidRequest
from chatjobs.models import StoredFile, uuid7
from chatjobs.settings import get_settings
from chatjobs.storable import clean_text

log = logging.getLogger("chatjobs.files")

CHUNK_BYTES = 1024 * 1024
# What an upload may be for: OpenAI's own list, so SDK code written for it runs unchanged.
# Only ``batch`` files can feed a batch; the others are stored and served.
# Not "evals": the SDK uploads it, but its FileObject type has no such purpose, so a strict
# client could not read the file back.
UPLOAD_PURPOSES = ("batch", "user_data", "assistants", "fine-tune", "vision")
BATCH_INPUT = "batch"
BATCH_OUTPUT = "batch_output"
MIN_EXPIRY_SECONDS = 3600
MAX_EXPIRY_SECONDS = 30 * 86400
MAX_FILENAME_CHARS = 512

SessionScope = Callable[[], AbstractContextManager[Session]]


# --- rules -------------------------------------------------------------------------------


def check_upload(*, purpose: str, filename: str, expires_after_seconds: int | None) -> None:
    """Refuse what no upload may be, with InvalidRequest naming the form field at fault."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose"
        )
    if not filename.strip():
        raise InvalidRequest("file must be sent with a filename", param="file")
    if len(filename) > MAX_FILENAME_CHARS:
        raise InvalidRequest(
            f"the filename must be at most {MAX_FILENAME_CHARS} characters", param="file"
        )
    if expires_after_seconds is not None and not (
        MIN_EXPIRY_SECONDS <= expires_after_seconds <= MAX_EXPIRY_SECONDS
    ):
        raise InvalidRequest(
            f"expires_after[seconds] must be between {MIN_EXPIRY_SECONDS} and {MAX_EXPIRY_SECONDS}",
            param="expires_after[seconds]",
        )


def default_expiry(purpose: str) -> int | None:
    """Seconds an upload without ``expires_after`` lives: batch input expires (30 days by
    default), other files stay until deleted, as at OpenAI."""
    return get_settings().file_expiry_seconds if purpose == BATCH_INPUT else None


def upload_hash(
    *, purpose: str, filename: str, expires_after_seconds: int | None, sha256: str
) -> str:
    """What an Idempotency-Key is bound to: the whole request, the content by its hash."""
    canonical = json.dumps(
        [purpose, filename, expires_after_seconds, sha256], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Measured:
    """``chunks`` regrouped into ~1 MiB pieces, counted and hashed as they pass;
    FileTooLarge as soon as more than ``limit`` bytes have come."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._chunks = chunks
        self._limit = limit
        self._hash = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        buffer = bytearray()
        for chunk in self._chunks:
            self.size += len(chunk)
            if self.size > self._limit:
                raise FileTooLarge(
                    f"the file exceeds {self._limit} bytes (CHATJOBS_MAX_UPLOAD_BYTES)",
                    param="file",
                )
            self._hash.update(chunk)
            buffer += chunk
            if len(buffer) >= CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)

    def drain(self) -> None:
        """Count and hash the rest without keeping it."""
        for _ in self:
            pass

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


# --- backends ----------------------------------------------------------------------------


class Backend(Protocol):
    """Where uploads' bytes live. ``write`` and ``delete`` join the session's transaction."""

    def write(self, session: Session, file_id: str, chunks: Iterable[bytes]) -> str:
        """Store the chunks; returns the location to keep in the row."""
        ...

    def read(self, location: str, sessions: SessionScope) -> Iterator[bytes]:
        """The content, in ~1 MiB chunks."""
        ...

    def delete(self, session: Session, location: str) -> None:
        """Remove the content once the session's transaction commits."""
        ...


class PostgresBackend:
    """Large objects: created, written and unlinked inside the caller's transaction."""

    def write(self, session: Session, file_id: str, chunks: Iterable[bytes]) -> str:
        oid: int | None = None
        offset = 0
        for chunk in chunks:
            if oid is None:
                oid = session.scalar(text("SELECT lo_from_bytea(0, :data)"), {"data": chunk})
            else:
                session.execute(
                    text("SELECT lo_put(CAST(:oid AS oid), :offset, :data)"),
                    {"oid": oid, "offset": offset, "data": chunk},
                )
            offset += len(chunk)
        if oid is None:  # an empty file
            oid = session.scalar(text("SELECT lo_from_bytea(0, ''::bytea)"))
        return str(oid)

    def read(self, location: str, sessions: SessionScope) -> Iterator[bytes]:
        # One short transaction per chunk: a slow download holds no pooled connection.
        offset = 0
        while True:
            with sessions() as session:
                chunk = session.scalar(
                    text("SELECT lo_get(CAST(:oid AS oid), :offset, :length)"),
                    {"oid": int(location), "offset": offset, "length": CHUNK_BYTES},
                )
            if chunk:
                yield bytes(chunk)
                offset += len(chunk)
            if not chunk or len(chunk) < CHUNK_BYTES:
                return

    def delete(self, session: Session, location: str) -> None:
        # Through the catalogue, so content already gone is no error.
        session.execute(
            text(
                "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = CAST(:oid AS oid)"
            ),
            {"oid": int(location)},
        )


class DirectoryBackend:
    """Files under ``root``, one per upload, sharded by the id's last two hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, session: Session, file_id: str, chunks: Iterable[bytes]) -> str:
        relative = f"{file_id[-2:]}/{file_id}"
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f".{file_id}.part")
        try:
            with partial.open("xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_directory(final.parent)
        _after(session, rollback=lambda: final.unlink(missing_ok=True))
        return relative

    def read(self, location: str, sessions: SessionScope) -> Iterator[bytes]:
        with (self.root / location).open("rb") as content:
            while chunk := content.read(CHUNK_BYTES):
                yield chunk

    def delete(self, session: Session, location: str) -> None:
        path = self.root / location
        _after(session, commit=lambda: path.unlink(missing_ok=True))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backend(storage: str) -> Backend:
    """The backend of a ``storage`` value (a row's, or CHATJOBS_FILE_STORAGE)."""
    if storage == "postgres":
        return PostgresBackend()
    if storage == "directory":
        return DirectoryBackend(get_settings().files_dir)
    raise ValueError(f"storage {storage!r} keeps no content of its own")


class _Hooks:
    """What to do to content outside the database when the session's transaction ends."""

    def __init__(self) -> None:
        self.on_commit: list[Callable[[], object]] = []
        self.on_rollback: list[Callable[[], object]] = []

    def committed(self, session: Session) -> None:
        self._run(self.on_commit)

    def rolled_back(self, session: Session) -> None:
        self._run(self.on_rollback)

    def _run(self, actions: list[Callable[[], object]]) -> None:
        pending = list(actions)
        self.on_commit.clear()
        self.on_rollback.clear()
        for action in pending:
            try:
                action()
            except OSError:
                log.exception("files: removing stored content failed")


def _after(
    session: Session,
    *,
    commit: Callable[[], object] | None = None,
    rollback: Callable[[], object] | None = None,
) -> None:
    hooks = session.info.get("chatjobs.files.hooks")
    if not isinstance(hooks, _Hooks):
        hooks = session.info["chatjobs.files.hooks"] = _Hooks()
        event.listen(session, "after_commit", hooks.committed)
        event.listen(session, "after_rollback", hooks.rolled_back)
    if commit is not None:
        hooks.on_commit.append(commit)
    if rollback is not None:
        hooks.on_rollback.append(rollback)


def _remove_content(session: Session, storage: str, location: str | None) -> None:
    if storage != "batch" and location is not None:
        backend(storage).delete(session, location)


# --- files -------------------------------------------------------------------------------


def new_id() -> str:
    return f"file-{uuid7().hex}"


def _by_key(session: Session, tenant_id: uuid.UUID, key: str) -> StoredFile | None:
    return session.scalars(
        select(StoredFile).where(
            StoredFile.tenant_id == tenant_id, StoredFile.idempotency_key == key
        )
    ).one_or_none()


def _replayed(earlier: StoredFile, request_hash: str) -> StoredFile:
    if earlier.request_hash != request_hash:
        raise IdempotencyConflict(
            "Idempotency-Key was already used for a different upload (file "
            f"{earlier.id}); use a new key for a new file"
        )
    return earlier


def store_upload(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    chunks: Iterable[bytes],
    filename: str,
    purpose: str,
    expires_after_seconds: int | None,
    idempotency_key: str | None,
) -> tuple[StoredFile, bool]:
    """Store an upload's content and row; returns the file and whether it is new.

    The content streams into CHATJOBS_FILE_STORAGE in ~1 MiB pieces while it is counted
    (FileTooLarge past CHATJOBS_MAX_UPLOAD_BYTES) and hashed. Both join the session's
    transaction: commit it to keep the file. An Idempotency-Key already used makes this a
    replay: the content is only hashed, never stored, and the same purpose, filename, expiry
    and bytes give the earlier file back (created False), anything else IdempotencyConflict.
    When another request takes the key meanwhile, the insert finds it and the content just
    written is deleted again in this transaction.
    """
    filename = clean_text(filename)
    check_upload(purpose=purpose, filename=filename, expires_after_seconds=expires_after_seconds)
    settings = get_settings()
    measured = Measured(chunks, settings.max_upload_bytes)
    seconds = expires_after_seconds or default_expiry(purpose)

    def request_hash() -> str:
        return upload_hash(
            purpose=purpose,
            filename=filename,
            expires_after_seconds=expires_after_seconds,
            sha256=measured.sha256,
        )

    earlier = _by_key(session, tenant_id, idempotency_key) if idempotency_key else None
    if earlier is not None:
        measured.drain()
        return _replayed(earlier, request_hash()), False
    file_id = new_id()
    store = backend(settings.file_storage)
    location = store.write(session, file_id, measured)
    stmt = insert(StoredFile).values(
        id=file_id,
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename,
        bytes=measured.size,
        sha256=measured.sha256,
        storage=settings.file_storage,
        location=location,
        idempotency_key=idempotency_key,
        request_hash=request_hash(),
        expires_at=func.now() + timedelta(seconds=seconds) if seconds else None,
    )
    if idempotency_key is not None:
        stmt = stmt.on_conflict_do_nothing(constraint="uq_files_tenant_idempotency_key")
    row = session.scalars(stmt.returning(StoredFile)).one_or_none()
    if row is not None:
        return row, True
    assert idempotency_key is not None  # a concurrent request with the key won the insert
    store.delete(session, location)
    earlier = _by_key(session, tenant_id, idempotency_key)
    assert earlier is not None
    return _replayed(earlier, request_hash()), False


def create_output_file(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    batch_id: str,
    kind: Literal["output", "error"],
    bytes_: int,
    expires_at: datetime | None,
) -> StoredFile:
    """The row of a batch's output or error file (purpose ``batch_output``). It stores no
    content: downloading it reads ``chatjobs.batches.output.chunks(batch_id, kind)``, so
    ``bytes_`` must be the size those chunks add up to."""
    if kind not in ("output", "error"):
        raise ValueError(f"kind must be output or error, not {kind!r}")
    return session.scalars(
        insert(StoredFile)
        .values(
            id=new_id(),
            tenant_id=tenant_id,
            purpose=BATCH_OUTPUT,
            filename=f"{batch_id}_{kind}.jsonl",
            bytes=bytes_,
            storage="batch",
            batch_id=batch_id,
            kind=kind,
            expires_at=expires_at,
        )
        .returning(StoredFile)
    ).one()


def _visible(tenant_id: uuid.UUID) -> list[ColumnElement[bool]]:
    # An expired file is gone at once, whenever the retention task gets to its content.
    return [
        StoredFile.tenant_id == tenant_id,
        or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > func.now()),
    ]


def get_file(session: Session, *, tenant_id: uuid.UUID, file_id: str) -> StoredFile:
    """The tenant's file; FileNotFound for a missing, expired or other tenant's file alike."""
    row = session.scalar(select(StoredFile).where(StoredFile.id == file_id, *_visible(tenant_id)))
    if row is None:
        raise FileNotFound(f"no file {file_id[:64]}")
    return row


def list_files(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    after: str | None = None,
    limit: int = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> tuple[list[StoredFile], bool]:
    """A page of the tenant's files by id (creation order), the ones past ``after``; and
    whether more follow."""
    query = select(StoredFile).where(*_visible(tenant_id))
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if order == "desc":
        if after is not None:
            query = query.where(StoredFile.id < after)
        query = query.order_by(StoredFile.id.desc())
    else:
        if after is not None:
            query = query.where(StoredFile.id > after)
        query = query.order_by(StoredFile.id)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, *, tenant_id: uuid.UUID, file_id: str) -> None:
    """Delete the tenant's file and, for an upload, its content (FileNotFound if none). A
    batch's output or error file only loses its row."""
    gone = session.execute(
        delete(StoredFile)
        .where(StoredFile.id == file_id, *_visible(tenant_id))
        .returning(StoredFile.storage, StoredFile.location)
    ).one_or_none()
    if gone is None:
        raise FileNotFound(f"no file {file_id[:64]}")
    _remove_content(session, gone.storage, gone.location)


def open_content(file: StoredFile, *, sessions: SessionScope = session_scope) -> Iterator[bytes]:
    """The file's bytes in ~1 MiB chunks, read as the iterator is consumed.

    Needs no session from the caller and holds none between chunks, so it serves a
    response stream, a Celery task or a script alike; ``file`` may be detached (read in a
    session that has ended). A large object is read one chunk per short transaction of
    ``sessions`` (chatjobs.db.session_scope unless given), so a slow reader never holds a
    pooled connection; a directory file is read from CHATJOBS_FILES_DIR; a batch's output or
    error file comes from ``chatjobs.batches.output.chunks``, which opens its own sessions.
    """
    if file.storage == "batch":
        from chatjobs.batches import output  # here: chatjobs.batches imports this module

        if file.batch_id is None or file.kind is None:
            raise ValueError(f"batch file {file.id} names no batch")
        return iter(output.chunks(file.batch_id, file.kind))
    if file.location is None:
        raise ValueError(f"file {file.id} has no location")
    return backend(file.storage).read(file.location, sessions)


def prune_expired(session: Session, limit: int = 500) -> int:
    """Delete up to ``limit`` expired files with their content; returns how many went.
    Rows another transaction holds are skipped (SKIP LOCKED) until the next pass."""
    doomed = (
        select(StoredFile.id)
        .where(StoredFile.expires_at <= func.now())
        .order_by(StoredFile.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    gone = session.execute(
        delete(StoredFile)
        .where(StoredFile.id.in_(doomed))
        .returning(StoredFile.storage, StoredFile.location)
    ).all()
    for storage, location in gone:
        _remove_content(session, storage, location)
    return len(gone)


def prune(*, batch: int = 500) -> int:
    """Delete every expired file, ``batch`` at a time, a transaction each (for the daily
    retention task); returns how many went."""
    total = 0
    while True:
        with session_scope() as session:
            gone = prune_expired(session, batch)
        total += gone
        if gone < batch:
            return total
