"""multipart/form-data read as it arrives: small fields kept, the one file part spooled.

Starlette's ``request.form()`` needs python-multipart, which chatjobs does not ship, and an
upload needs limits of its own anyway: the file part is counted as it arrives (413 as soon as
it passes the limit, before the rest is read), every other part is a short field, and no part
is ever held whole in memory. The file goes to a temporary file (in memory up to 1 MiB, then
on disk under TMPDIR) rather than straight into storage, for two reasons: the fields may come
in any order (curl sends them in the order of its ``-F`` options), and the database sees the
content only once it has all arrived, so a slow client never holds a pooled connection open
for the minutes its upload takes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from urllib.parse import unquote

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from chatjobs.errors import FileTooLarge, InvalidRequest

CHUNK_BYTES = 1024 * 1024
MAX_PARTS = 16
MAX_FIELD_BYTES = 1024
MAX_HEADER_BYTES = 8192
# A header's parameters: `; name=value` or `; name="quoted \" value"`.
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def parse_header(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type or Content-Disposition value: its lower-cased kind and its parameters
    (names lower-cased, quotes removed, ``filename*`` (RFC 5987) decoded into ``filename``)."""
    kind, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    extended = params.pop("filename*", None)
    if extended is not None:
        charset, _, encoded = extended.partition("'")
        _, _, encoded = encoded.partition("'")
        # A charset Python does not know: keep the plain filename.
        # An unknown charset, or one whose codec refuses the bytes (idna, punycode, ...):
        # the plain filename parameter, if any, stands.
        with contextlib.suppress(LookupError, UnicodeError, ValueError):
            params["filename"] = unquote(encoded, encoding=charset or "utf-8", errors="replace")
    return kind.strip().lower(), params


def boundary(content_type: str | None) -> bytes:
    """The boundary a multipart/form-data Content-Type names; InvalidRequest otherwise."""
    kind, params = parse_header(content_type or "")
    value = params.get("boundary", "")
    if kind != "multipart/form-data" or not 0 < len(value) <= 200 or not value.isascii():
        raise InvalidRequest(
            "the body must be multipart/form-data (Content-Type: multipart/form-data; boundary=...)"
        )
    return value.encode()


@dataclass(frozen=True)
class Part:
    """The start of one part: its field name and, for a file, the filename it was sent with."""

    name: str
    filename: str | None
    content_type: str | None


def _malformed(why: str) -> InvalidRequest:
    return InvalidRequest(f"malformed multipart body: {why}")


def _part(block: bytes) -> Part:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise _malformed("a part header without a colon")
        headers[name.strip().lower()] = value.strip()
    kind, params = parse_header(headers.get("content-disposition", ""))
    if kind != "form-data" or not params.get("name"):
        raise _malformed('every part needs Content-Disposition: form-data; name="..."')
    return Part(params["name"], params.get("filename"), headers.get("content-type"))


_PREAMBLE, _DELIMITED, _HEADERS, _DATA, _DONE = range(5)


class Parser:
    """A push parser: ``feed`` bytes as they arrive and get back, in order, a ``Part`` where
    each part starts and ``bytes`` of its content; ``close`` at the end of the body.

    It keeps at most one delimiter's length of content (or one part's headers) between
    calls, whatever the size of the parts.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # The body may begin with the first delimiter: a CRLF before it makes that one look
        # like every other.
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE

    def feed(self, data: bytes) -> list[Part | bytes]:
        self._buffer += data
        events: list[Part | bytes] = []
        while True:
            if self._state in (_PREAMBLE, _DATA):
                at = self._buffer.find(self._delimiter)
                if at < 0:
                    # Keep what may be the start of a delimiter split across two feeds.
                    cut = len(self._buffer) - len(self._delimiter) + 1
                    if cut > 0:
                        if self._state == _DATA:
                            events.append(bytes(self._buffer[:cut]))
                        del self._buffer[:cut]
                    return events
                if self._state == _DATA and at:
                    events.append(bytes(self._buffer[:at]))
                del self._buffer[: at + len(self._delimiter)]
                self._state = _DELIMITED
            if self._state == _DELIMITED:
                if len(self._buffer) < 2:
                    return events
                if self._buffer[:2] == b"--":
                    self._state = _DONE
                elif self._buffer[:2] == b"\r\n":
                    self._state = _HEADERS
                else:
                    raise _malformed("a boundary must be followed by CRLF or --")
            if self._state == _HEADERS:
                # From the CRLF that ended the delimiter line: a part without headers is
                # then the empty block before CRLF CRLF.
                end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
                if end < 0:
                    if len(self._buffer) > MAX_HEADER_BYTES + 4:
                        raise _malformed(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
                    return events
                events.append(_part(bytes(self._buffer[2:end])))
                del self._buffer[: end + 4]
                self._state = _DATA
            if self._state == _DONE:
                self._buffer.clear()  # the epilogue, ignored
                return events

    def close(self) -> None:
        if self._state != _DONE:
            raise _malformed("the body ended before the closing boundary")


@dataclass
class Upload:
    """The file part: the filename it came with, its size, and its content, spooled."""

    filename: str | None
    size: int = 0
    content: SpooledTemporaryFile[bytes] = field(
        default_factory=lambda: SpooledTemporaryFile(max_size=CHUNK_BYTES)  # noqa: SIM115
    )

    def chunks(self) -> Iterator[bytes]:
        """The content from its start, in ~1 MiB reads (blocking: call from a thread)."""
        self.content.seek(0)
        while chunk := self.content.read(CHUNK_BYTES):
            yield chunk


@dataclass
class Form:
    """A whole multipart body: its text fields by name, and the file part if one came.
    Close it (or use it as a context manager) to drop the spooled file."""

    fields: dict[str, str] = field(default_factory=dict)
    file: Upload | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.content.close()

    def __enter__(self) -> Form:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reader:
    """Parser events into a Form, under the limits."""

    def __init__(self, form: Form, file_field: str, max_file_bytes: int) -> None:
        self.form = form
        self.file_field = file_field
        self.max_file_bytes = max_file_bytes
        self.parts = 0
        self.current: Part | None = None
        self.value = bytearray()  # the current field's, or the file's next write

    async def on(self, event: Part | bytes) -> None:
        if isinstance(event, Part):
            await self.end_part()
            self.start(event)
        elif self.current is not None and self.current.name == self.file_field:
            upload = self.form.file
            assert upload is not None
            upload.size += len(event)
            if upload.size > self.max_file_bytes:
                raise FileTooLarge(
                    f"the file exceeds {self.max_file_bytes} bytes (CHATJOBS_MAX_UPLOAD_BYTES)",
                    param=self.file_field,
                )
            self.value += event
            if len(self.value) >= CHUNK_BYTES:
                await self.flush(upload)
        elif self.current is not None:
            self.value += event
            if len(self.value) > MAX_FIELD_BYTES:
                raise InvalidRequest(
                    f"{self.current.name} exceeds {MAX_FIELD_BYTES} bytes",
                    param=self.current.name,
                )

    def start(self, part: Part) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        if part.name in self.form.fields or (
            part.name == self.file_field and self.form.file is not None
        ):
            raise InvalidRequest(f"{part.name} was sent more than once", param=part.name)
        if part.name == self.file_field:
            self.form.file = Upload(part.filename)
        self.current = part

    async def flush(self, upload: Upload) -> None:
        # On disk past the first MiB: written from a thread, off the event loop.
        await run_in_threadpool(upload.content.write, bytes(self.value))
        self.value.clear()

    async def end_part(self) -> None:
        part, self.current = self.current, None
        if part is None:
            return
        if part.name == self.file_field:
            assert self.form.file is not None
            await self.flush(self.form.file)
            return
        try:
            self.form.fields[part.name] = self.value.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"{part.name} must be UTF-8 text", param=part.name) from None
        self.value.clear()


async def read_form(request: Request, *, file_field: str, max_file_bytes: int) -> Form:
    """Read the request's multipart body: at most one part named ``file_field``, spooled
    (FileTooLarge once it passes ``max_file_bytes``), and short text fields (InvalidRequest
    for one over MAX_FIELD_BYTES, a name sent twice, or a malformed body)."""
    parser = Parser(boundary(request.headers.get("content-type")))
    form = Form()
    reader = _Reader(form, file_field, max_file_bytes)
    try:
        async for data in request.stream():
            for event in parser.feed(data):
                await reader.on(event)
        parser.close()
        await reader.end_part()
    except ClientDisconnect:
        form.close()
        # Nobody will read the answer; a 400 keeps it out of the log of unexpected errors.
        raise _malformed("the client disconnected before the body ended") from None
    except BaseException:
        form.close()
        raise
    return form
