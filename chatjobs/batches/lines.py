"""One line of a batch input file, checked the way OpenAI's Batch API checks it.

Pure functions: bytes in, a ``Line`` or a ``LineError`` out. The codes are OpenAI's
(``invalid_json_line``, ``duplicate_custom_id``, ``url_mismatch``, ``model_mismatch``,
``empty_file``, ``too_many_tasks``), plus ``invalid_request`` for a body the chat-completion
schema refuses and ``line_too_long`` for a line past the body size limit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from chatjobs.schemas import ChatCompletionRequest
from chatjobs.storable import clean_text, first_offence

ENDPOINT = "/v1/chat/completions"
MAX_CUSTOM_ID = 512
# errors.data is kept to this many entries: enough to fix a file, bounded for a hostile one.
MAX_ERRORS = 1000


@dataclass(frozen=True)
class Line:
    """A valid line: its number (1-based), custom_id, body (as sent) and model."""

    number: int
    custom_id: str
    body: dict[str, Any]
    model: str | None


@dataclass(frozen=True)
class LineError:
    """One entry of a failed batch's ``errors.data``."""

    code: str
    line: int | None
    message: str
    param: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


# A line with something other than whitespace on it (bytes.strip's whitespace).
_NON_BLANK = re.compile(rb"[^\n]*[^\s][^\n]*")


def split_lines(chunks: Iterable[bytes], max_line: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, content) for every non-blank line of a stream of chunks; content is None
    for a line longer than ``max_line`` bytes, which is skipped without being held whole.

    Blank lines cost no Python per line: the lines of a chunk are found by a regular
    expression and the newlines between them counted in C.
    """
    number = 0  # lines ended so far
    pending = bytearray()  # the start of a line that began in an earlier chunk
    too_long = False
    for chunk in chunks:
        first = chunk.find(b"\n")
        if first < 0:
            if not too_long:
                pending += chunk
                if len(pending) > max_line:
                    too_long, pending = True, bytearray()
            continue
        number += 1
        if too_long or len(pending) + first > max_line:
            yield number, None
        elif pending.strip() or chunk[:first].strip():
            yield number, bytes(pending) + chunk[:first]
        pending.clear()
        too_long = False
        last = chunk.rfind(b"\n")
        pos = first + 1
        for match in _NON_BLANK.finditer(chunk, pos, last):
            number += chunk.count(b"\n", pos, match.start()) + 1
            yield number, None if match.end() - match.start() > max_line else match.group()
            pos = match.end() + 1  # past the line's newline
        if pos <= last:
            number += chunk.count(b"\n", pos, last + 1)
        tail = chunk[last + 1 :]
        if len(tail) > max_line:
            too_long = True
        else:
            pending += tail
    if too_long or pending.strip():
        yield number + 1, None if too_long else bytes(pending)


def _error(code: str, number: int, message: str, param: str | None = None) -> LineError:
    return LineError(code, number, clean_text(message)[:1000], param)


def _schema_error(number: int, exc: ValidationError) -> LineError:
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first.get("loc", ()))
    param = f"body.{path}" if path else "body"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return _error("invalid_request", number, f"{param}: {message}", param)


def parse(number: int, raw: bytes | None, *, endpoint: str, max_line: int) -> Line | LineError:
    """Check one line: JSON object with a custom_id, method POST, the batch's url, and a
    body the chat-completion schema accepts (not streaming)."""
    if raw is None:
        return _error("line_too_long", number, f"This line is longer than {max_line} bytes.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return _error("invalid_json_line", number, "This line is not parseable as valid JSON.")
    if not isinstance(data, dict):
        return _error("invalid_json_line", number, "This line is not a JSON object.")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(
            "invalid_request", number, "custom_id must be a non-empty string.", "custom_id"
        )
    if len(custom_id) > MAX_CUSTOM_ID or first_offence(custom_id) is not None:
        return _error(
            "invalid_request",
            number,
            f"custom_id must be at most {MAX_CUSTOM_ID} characters of storable text.",
            "custom_id",
        )
    if data.get("method") != "POST":
        return _error("invalid_request", number, "method must be POST.", "method")
    if data.get("url") != endpoint:
        return _error(
            "url_mismatch",
            number,
            f"The url of this line does not match the batch's endpoint {endpoint}.",
            "url",
        )
    body = data.get("body")
    if not isinstance(body, dict):
        return _error("invalid_request", number, "body must be a JSON object.", "body")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        return _schema_error(number, exc)
    if request.stream:
        return _error(
            "invalid_request",
            number,
            "Batch requests cannot stream: remove stream or set it to false.",
            "body.stream",
        )
    return Line(number, custom_id, body, request.model)


class Checker:
    """What holds across lines: duplicate custom_ids, one model, the line limit."""

    def __init__(self, *, max_lines: int, default_model: str) -> None:
        self.max_lines = max_lines
        self.default_model = default_model
        self.model: str | None = None
        self.count = 0
        self._seen: set[bytes] = set()

    def check(self, line: Line) -> LineError | None:
        self.count += 1
        if self.count > self.max_lines:
            return _error(
                "too_many_tasks",
                line.number,
                f"The file has more than {self.max_lines} requests; split it into batches.",
            )
        digest = hashlib.blake2b(line.custom_id.encode(), digest_size=16).digest()
        if digest in self._seen:
            return _error(
                "duplicate_custom_id",
                line.number,
                f"The custom_id {line.custom_id!r} is used by an earlier line.",
                "custom_id",
            )
        self._seen.add(digest)
        model = line.model or self.default_model
        if self.model is None:
            self.model = model
        elif model != self.model:
            return _error(
                "model_mismatch",
                line.number,
                f"This line's model {model!r} differs from the file's model {self.model!r}; "
                "a batch holds requests to one model.",
                "body.model",
            )
        return None
