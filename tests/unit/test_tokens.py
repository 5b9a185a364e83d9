"""Offline token counting against an independent BPE implementation, linear on any text, and
the model registry."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import math
import os
import random
import string
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatjobs import tokens
from chatjobs.tokens import (
    DEFAULT_MODEL_SPEC,
    ENCODINGS,
    MESSAGE_PART_TOKENS,
    RUN_CUT,
    ModelSpec,
    TokenCount,
    TokenizerDataError,
    count_messages,
    count_text,
    encode_text,
    get_encoding,
    lookup_model,
    upper_bound_tokens,
)

with warnings.catch_warnings():
    # bpe_openai reads its data through importlib.resources.open_binary, deprecated in 3.11.
    warnings.simplefilter("ignore", DeprecationWarning)
    import bpe_openai

SAMPLES = {
    "latin": "The quick brown fox jumps over the lazy dog. Ça va? Größe, naïve café!",
    "cjk": "我们在系统中处理大量的请求。日本語の文章はひらがなとカタカナと漢字。한국어 문장입니다.",
    "arabic": "مرحبا بالعالم، هذه جملة عربية للاختبار؟ والأرقام ١٢٣ أيضا.",
    "emoji": "Deploy done 🚀🎉 👩🏽‍💻 🇯🇵 🧑‍🚀!!",
    "code": 'def f(x: int) -> dict[str, int]:\n    return {"x": x ** 2}  # \U0001d518\n\tpass\r\n',
    "mixed": "Price: $1,234.56 — 50% off (éà) 東京 αβγ\n\n\n   indented\ttab 0xDEADBEEF",
    "special": "before <|endoftext|> middle <|endofprompt|> <|fim_prefix|> after",
}

COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


# --------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_counts_equal_independent_bpe_implementation(encoding: str, sample: str) -> None:
    text = SAMPLES[sample]
    reference = bpe_openai.get_encoding(encoding).encode(text, disallowed_special=())
    assert get_encoding(encoding).encode_ordinary(text) == reference
    assert count_text(text, encoding) == len(reference)


@pytest.mark.parametrize(
    ("encoding", "ids"), [("o200k_base", [24912, 2375]), ("cl100k_base", [15339, 1917])]
)
def test_known_token_ids_of_hello_world(encoding: str, ids: list[int]) -> None:
    assert get_encoding(encoding).encode_ordinary("hello world") == ids
    assert get_encoding(encoding).decode(ids) == "hello world"


def test_special_token_text_counts_as_ordinary_text() -> None:
    text = "<|endoftext|>"
    assert count_text(text, "o200k_base") == 7
    assert count_text(text, "cl100k_base") > 1


def test_get_encoding_is_cached_and_rejects_unknown_names() -> None:
    assert get_encoding("o200k_base") is get_encoding("o200k_base")
    assert get_encoding("o200k_base").name == "o200k_base"
    with pytest.raises(ValueError, match="p50k_base"):
        get_encoding("p50k_base")


def test_corrupt_rank_file_raises_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(b"IQ== 0\n"))
    monkeypatch.setattr(tokens, "_bpe_openai_dir", lambda: tmp_path)
    monkeypatch.setattr(tokens, "_encodings", {})
    with pytest.raises(TokenizerDataError, match="sha256"):
        get_encoding("cl100k_base")


NO_NETWORK_SCRIPT = textwrap.dedent(
    """
    import socket, sys, threading

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    from chatjobs.tokens import count_text, get_encoding

    found = []
    threads = [
        threading.Thread(target=lambda name=name: found.append(get_encoding(name)))
        for name in ("o200k_base", "cl100k_base") * 4
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(encoding) for encoding in found}) == 2, found
    assert get_encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
    assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert "bpe_openai" not in sys.modules
    print("ok")
    """
)


def test_encodings_load_without_network_in_a_fresh_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_GYM_CACHE_DIR",)}
    # An empty cache: a fallback to tiktoken's downloader would need the (refused) network.
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env["TIKTOKEN_CACHE_DIR"] = str(cache)
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Counting


TYPICAL_TEXT = """Durable jobs outlive the process that started them. Each job is stored
before it is queued, so a crash between the two loses nothing: a sweeper finds jobs that were
never queued and queues them again. Retries wait longer each time, up to a cap.

    def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
        \"\"\"Seconds to wait before the given attempt, with full jitter.\"\"\"
        return random.uniform(0, min(cap, base * 2 ** attempt))
"""


def test_estimate_is_a_third_of_the_utf8_bytes_rounded_up() -> None:
    assert count_text("", None) == 0
    assert count_text("abcd", None) == 2
    assert count_text("東京", None) == 2  # 6 bytes
    for text in SAMPLES.values():
        assert count_text(text, None) == math.ceil(len(text.encode()) / 3)
    # An upper bound for typical English and code; dense samples (emoji, Arabic in
    # cl100k_base) go over it, as the docstring says.
    for encoding in ENCODINGS:
        assert count_text(TYPICAL_TEXT, None) >= count_text(TYPICAL_TEXT, encoding)
        assert count_text(SAMPLES["latin"], None) >= count_text(SAMPLES["latin"], encoding)


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4-0613", 129), ("gpt-3.5-turbo-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_example_prompt_tokens(model: str, expected: int) -> None:
    spec = lookup_model(model)
    assert count_messages(COOKBOOK_MESSAGES, spec) == TokenCount(expected, spec.encoding or "")


def test_message_framing_arithmetic() -> None:
    spec = lookup_model("gpt-4.1")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief.", "name": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "input_text", "text": "<|endoftext|>"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]

    def t(text: str) -> int:
        return count_text(text, "o200k_base")

    parts = (
        t("system") + t("Be brief.") + t("rules") + 1
        + t("user") + t("What is in this picture?") + MESSAGE_PART_TOKENS + t("<|endoftext|>")
        + t("assistant") + t(json.dumps([call]))
        + t("tool") + t("sunny")
    )  # fmt: skip
    assert count_messages(messages, spec).tokens == parts + 3 * len(messages) + 3
    with_tools = count_messages(messages, spec, tools=tools).tokens
    assert with_tools > parts + 3 * len(messages) + 3 + t(json.dumps(tools)) - 1


def test_unknown_tokenizer_estimates() -> None:
    spec = lookup_model("llama-3-70b")
    count = count_messages([{"role": "user", "content": "hello there"}], spec)
    assert count == TokenCount(3 + 3 + count_text("user", None) + 4, "estimate")


# --------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt-4.1", "gpt-4.1"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini", "gpt-4.1-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("GPT-4o", "gpt-4o"),
        ("openai/gpt-4.1", "gpt-4.1"),
        ("@cf/openai/gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-32k-0613", "gpt-4-32k"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("o1-mini-2024-09-12", "o1-mini"),
        ("o1-2024-12-17", "o1"),
        ("gpt-5-nano", "gpt-5-nano"),
    ],
)
def test_lookup_matches_longest_known_prefix(name: str, expected: str) -> None:
    assert lookup_model(name).name == expected


def test_builtin_limits() -> None:
    assert lookup_model("gpt-4.1") == ModelSpec("gpt-4.1", 1_047_576, 32_768, "o200k_base")
    assert lookup_model("gpt-4o-mini") == ModelSpec("gpt-4o-mini", 128_000, 16_384, "o200k_base")
    assert lookup_model("gpt-4") == ModelSpec("gpt-4", 8_192, 8_192, "cl100k_base")
    assert lookup_model("gpt-3.5-turbo").context_window == 16_385
    assert lookup_model("gpt-5").context_window == 400_000


@pytest.mark.parametrize("name", ["gpt-4.5-preview", "gpt-4omni", "llama-3", "", "openai/"])
def test_unknown_models_get_the_default(name: str) -> None:
    assert lookup_model(name) == DEFAULT_MODEL_SPEC
    assert ModelSpec("unknown", 8_192, 4_096, None) == DEFAULT_MODEL_SPEC
    mine = ModelSpec("mine", 1_000, 100, "cl100k_base")
    assert lookup_model(name, default=mine) is mine


def test_overrides_win_and_define_new_models() -> None:
    overrides: dict[str, dict[str, Any]] = {
        "gpt-4o": {"context_window": 64_000},
        "Llama-3.1-8B": {"context_window": 131_072, "max_output_tokens": 2_048},
        "@cf/meta/llama-3-8b": {"context_window": 7_000, "encoding": "cl100k_base"},
    }
    assert lookup_model("gpt-4o-2024-08-06", overrides=overrides) == ModelSpec(
        "gpt-4o", 64_000, 16_384, "o200k_base"
    )
    assert lookup_model("gpt-4o-mini", overrides=overrides).context_window == 128_000
    assert lookup_model("llama-3.1-8b-instruct", overrides=overrides) == ModelSpec(
        "llama-3.1-8b", 131_072, 2_048, None
    )
    assert lookup_model("@cf/meta/llama-3-8b", overrides=overrides).context_window == 7_000
    assert lookup_model("gpt-4.1", overrides={"gpt-4.1": {"encoding": None}}).encoding is None


@pytest.mark.parametrize(
    "fields",
    [{"context_window": "big"}, {"context_window": 0}, {"encoding": "p50k_base"}, {"windw": 1}],
)
def test_malformed_overrides_raise(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="model 'x'"):
        lookup_model("x", overrides={"x": fields})


# --------------------------------------------------------------------------------------------
# Linear time on any content

_CJK = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000))
_EMOJI = "".join(chr(c) for c in range(0x1F600, 0x1F650)) + "🚀🎉👩🏽‍💻"


def _pick(alphabet: str, count: int) -> str:
    return "".join(random.Random(count).choices(alphabet, k=count))


@functools.cache
def pathological(name: str, size: int) -> str:
    return PATHOLOGICAL[name](size)


# Texts of about `size` UTF-8 bytes, each one long tiktoken piece or close to it.
PATHOLOGICAL: dict[str, Callable[[int], str]] = {
    "repeated_letter": lambda size: "a" * size,
    "random_lowercase": lambda size: _pick(string.ascii_lowercase, size),
    "random_letters": lambda size: _pick(string.ascii_letters, size),
    "cjk_without_punctuation": lambda size: _pick(_CJK, size // 3),
    "emoji": lambda size: _pick(_EMOJI, size // 4),
    "punctuation": lambda size: _pick("!#$%&()*+,-.:;<=>?@[]^_{|}~", size),
    "spaces": lambda size: " " * size,
    "newlines": lambda size: "\n" * size,
    "whitespace_mix": lambda size: _pick(" \t\n\r\u3000", size // 2),
    "slash_newline": lambda size: "/\n" * (size // 2),
    "unit_separators": lambda size: "!\x1c" * (size // 2),
    "json_escapes": lambda size: '\\"\\n' * (size // 4),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_a_megabyte_of_pathological_text_counts_quickly(encoding: str, name: str) -> None:
    text = pathological(name, 1_000_000)
    get_encoding(encoding)
    started = time.process_time()
    count = count_text(text, encoding)
    # Generous: ~0.15 s here; unguarded, random lowercase took 0.6 s and spaces crashed.
    assert time.process_time() - started < 5
    assert 0 < count <= len(text.encode("utf-8"))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_cut_runs_change_the_count_by_a_few_tokens_per_cut(encoding: str, name: str) -> None:
    text = pathological(name, 50_000)
    tokens = encode_text(text, encoding)
    assert get_encoding(encoding).decode_bytes(tokens) == text.encode("utf-8")
    exact = len(get_encoding(encoding).encode_ordinary(text))
    cuts = len(text) // RUN_CUT
    assert cuts > 0
    assert len(tokens) == count_text(text, encoding)
    assert abs(len(tokens) - exact) <= 3 * cuts, (len(tokens), exact, cuts)


def _long_normal_texts() -> dict[str, str]:
    rng = random.Random(5)
    # Paragraphs of up to ~900 characters without a space or digit, as Chinese is written.
    sentences = ["".join(rng.choices(_CJK, k=rng.randint(20, 300))) + "。" for _ in range(300)]
    return {
        "prose_and_code": TYPICAL_TEXT * 400,
        "cjk_paragraphs": "\n\n".join(
            "".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)
        ),
        "base64": base64.b64encode(rng.randbytes(300_000)).decode(),
        "hex": rng.randbytes(100_000).hex(),
        "url": "https://example.com/a/b?" + "&".join(f"k{i}=v{i}" for i in range(20_000)),
        "indentation": "\n".join(" " * rng.randint(0, 900) + "x" for _ in range(500)),
        "samples": "\n".join(SAMPLES.values()) * 300,
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", sorted(_long_normal_texts()))
def test_text_without_overlong_runs_counts_exactly(encoding: str, name: str) -> None:
    text = _long_normal_texts()[name]
    assert len(text) > 20 * RUN_CUT
    assert encode_text(text, encoding) == get_encoding(encoding).encode_ordinary(text)


_WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)
}


def _reference_runs(text: str) -> set[tuple[int, int]]:
    """Runs of RUN_CUT+ characters of each class, by looking at every character."""
    classes: list[Callable[[str], bool]] = [
        lambda c: c in _WHITE_SPACE,
        lambda c: c not in _WHITE_SPACE and not c.isdecimal(),
        lambda c: c in "\r\n/",
    ]
    runs = set()
    for member in classes:
        position = 0
        for inside, group in itertools.groupby(text, key=member):
            size = len(list(group))
            if inside and size >= RUN_CUT:
                runs.add((position, position + size))
            position += size
    return runs


@pytest.mark.parametrize("seed", range(6))
def test_runs_are_found_exactly_on_ascii_and_unicode_text(seed: int) -> None:
    rng = random.Random(seed)
    alphabets = [
        "ab", " \t", "\r\n/", "a1", "x\u3000", "\u3000 \n", "東京", "é!", "٣a", "\x1c!", "7",
        "\xa0\x85", "🚀\u200d", "a b", "/",
    ]  # fmt: skip
    ascii_only = seed % 2 == 0
    if ascii_only:
        alphabets = [a for a in alphabets if a.isascii()]
    text = "".join(
        "".join(rng.choices(rng.choice(alphabets), k=rng.choice([5, 900, 1023, 1024, 2500])))
        for _ in range(60)
    )
    assert text.isascii() == ascii_only
    assert set(tokens._runs(text)) == _reference_runs(text)


# --------------------------------------------------------------------------------------------
# Upper bound


def _random_text(rng: random.Random) -> str:
    alphabet = rng.choice(
        [string.ascii_letters + " ", _CJK, _EMOJI, "\U0001d518\ud800 x", " \n", "<|endoftext|>"]
    )
    return "".join(rng.choices(alphabet, k=rng.choice([0, 1, 3, 40, 600])))


def _random_message(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return rng.choice([None, "a string", 7, ["list"]])
    message: dict[str, Any] = {"role": rng.choice(["system", "user", "assistant", "tool", ""])}
    if rng.random() < 0.3:
        message["name"] = _random_text(rng)
    if rng.random() < 0.1:
        message["role"] = rng.choice([None, 3])
    roll = rng.random()
    if roll < 0.4:
        message["content"] = _random_text(rng)
    elif roll < 0.8:
        parts: list[Any] = []
        for _ in range(rng.randint(0, 5)):
            kind = rng.choice(["text", "input_text", "output_text", "refusal", "image_url"])
            if kind == "image_url":
                parts.append({"type": kind, "image_url": {"url": "https://x.y/a.png"}})
            elif kind == "refusal":
                parts.append({"type": kind, "refusal": _random_text(rng)})
            else:
                parts.append({"type": kind, "text": rng.choice([_random_text(rng), None, 5])})
            if rng.random() < 0.1:
                parts.append(rng.choice(["bare string", None, {"type": "input_audio"}, {}]))
        message["content"] = parts
    else:
        message["content"] = rng.choice([None, 12, {"not": "content"}])
    if rng.random() < 0.2:
        arguments = json.dumps({"q": _random_text(rng)}, ensure_ascii=rng.random() < 0.5)
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        message["tool_calls"] = [call] * rng.randint(1, 3)
    if rng.random() < 0.05:
        message["function_call"] = {"name": "g", "arguments": _random_text(rng)}
    return message


def test_upper_bound_is_never_below_any_count() -> None:
    rng = random.Random(3)
    specs = [lookup_model("gpt-4.1"), lookup_model("gpt-4"), lookup_model("llama-3")]
    for _ in range(400):
        messages = [_random_message(rng) for _ in range(rng.randint(0, 6))]
        tools = None
        if rng.random() < 0.3:
            tools = [
                {"type": "function", "function": {"name": "f", "description": _random_text(rng)}}
            ]
        bound = upper_bound_tokens(messages, tools)
        for spec in specs:
            assert count_messages(messages, spec, tools=tools).tokens <= bound, messages


def test_upper_bound_is_bytes_plus_framing() -> None:
    assert upper_bound_tokens([]) == 3
    assert upper_bound_tokens([{"role": "user", "content": "héllo"}]) == 3 + 3 + 4 + 6
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    parts = [{"type": "text", "text": "東京"}, image]
    assert upper_bound_tokens([{"role": "user", "content": parts, "name": "n"}]) == (
        3 + 3 + 4 + 1 + 1 + 6 + MESSAGE_PART_TOKENS
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert upper_bound_tokens([], tools) == 3 + len(json.dumps(tools)) + 12


def test_upper_bound_of_ten_megabytes_is_quick() -> None:
    messages = [
        {"role": "user", "content": "東京" * 1_750_000},
        {"role": "user", "content": "a" * 10**7},
    ]
    started = time.process_time()
    assert upper_bound_tokens(messages) == 3 + 2 * (3 + 4) + 10_500_000 + 10**7
    assert time.process_time() - started < 1
