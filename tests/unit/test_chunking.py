"""split_text: every chunk fits counted alone, order and text are kept, overlap is bounded."""

from __future__ import annotations

import base64
import itertools
import random
import string
import time

import pytest

from chatjobs.chunking import split_text
from chatjobs.tokens import count_text

ENCODINGS = ["o200k_base", "cl100k_base", None]
_WORDS = ("job", "queue", "retry", "worker", "token", "budget", "model", "window", "answer")


def _latin(rng: random.Random, paragraphs: int) -> str:
    # Numbered words, so a piece of text occurs once and overlaps can be located exactly.
    counter = iter(range(10**9))

    def sentence() -> str:
        words = [f"{rng.choice(_WORDS)}{next(counter)}" for _ in range(rng.randint(3, 18))]
        return " ".join(words).capitalize() + rng.choice(".?!")

    return "\n\n".join(
        " ".join(sentence() for _ in range(rng.randint(1, 6))) for _ in range(paragraphs)
    )


RNG = random.Random(7)
TEXTS = {
    "latin": _latin(RNG, 60),
    "cjk": "".join(
        RNG.choice("我们处理请求日本語の文章ひらがなカタカナ漢字東京大阪") for _ in range(3000)
    ),
    "cjk_sentences": "".join(
        "".join(RNG.choice("系统任务数据库事务一致性可靠") for _ in range(RNG.randint(5, 30)))
        + "。"
        for _ in range(150)
    ),
    "giant_sentence": " ".join(f"{RNG.choice(_WORDS)}{i}" for i in range(3000)),
    "one_word": "a" * 50_000,
    "base64": base64.b64encode(RNG.randbytes(15_000)).decode(),
    "emoji": "".join(
        RNG.choice(["🚀", "🎉", "👩🏽‍💻", "🇯🇵", "🧑‍🚀", "😀", " "]) for _ in range(2000)
    ),
    "code": "\n".join(
        f"    value_{i} = compute(value_{i - 1}, {RNG.randint(0, 999)})  # step {i}"
        for i in range(1, 600)
    ),
}


def assert_fits(chunks: list[str], encoding: str | None, max_tokens: int) -> None:
    assert chunks
    assert all(chunk and chunk == chunk.strip() for chunk in chunks)
    counts = [count_text(chunk, encoding) for chunk in chunks]
    assert max(counts) <= max_tokens, counts


def assert_reconstructs(text: str, chunks: list[str]) -> None:
    """The chunks are the text in order, up to whitespace where one ends and the next starts."""
    position = 0
    for chunk in chunks:
        found = text.index(chunk, position)
        assert text[position:found].strip() == ""
        position = found + len(chunk)
    assert text[position:].strip() == ""


def overlap_of(previous: str, chunk: str) -> str:
    """The longest start of `chunk` that ends `previous`."""
    for size in range(min(len(previous), len(chunk)), 0, -1):
        if previous.endswith(chunk[:size]):
            return chunk[:size]
    return ""


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("max_tokens", [5, 300])
def test_every_chunk_fits_and_the_text_is_kept(
    encoding: str | None, name: str, max_tokens: int
) -> None:
    text = TEXTS[name]
    chunks = split_text(text, encoding=encoding, max_tokens=max_tokens)
    assert_fits(chunks, encoding, max_tokens)
    assert_reconstructs(text, chunks)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_overlapping_chunks_fit(encoding: str | None, name: str) -> None:
    text = TEXTS[name]
    chunks = split_text(text, encoding=encoding, max_tokens=300, overlap_tokens=40)
    assert_fits(chunks, encoding, 300)
    assert len(chunks) > 2


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_overlap_is_present_bounded_and_starts_at_a_word(encoding: str | None) -> None:
    text = TEXTS["latin"]
    chunks = split_text(text, encoding=encoding, max_tokens=200, overlap_tokens=30)
    assert_fits(chunks, encoding, 200)
    rest = []
    for previous, chunk in itertools.pairwise(chunks):
        overlap = overlap_of(previous, chunk)
        assert 5 <= count_text(overlap, encoding) <= 30, overlap
        # Cut at a word boundary: the overlap starts right after whitespace in the previous.
        assert previous[len(previous) - len(overlap) - 1].isspace()
        rest.append(chunk[len(overlap) :])
    # Without their overlaps the chunks are the text again, in order.
    assert_reconstructs(text, [chunks[0], *(part.strip() for part in rest)])


def test_tiny_budget_with_overlap() -> None:
    text = TEXTS["latin"][:2000]
    chunks = split_text(text, encoding="o200k_base", max_tokens=5, overlap_tokens=2)
    assert_fits(chunks, "o200k_base", 5)
    assert sum(bool(overlap_of(a, b)) for a, b in itertools.pairwise(chunks)) > 0


def test_chunks_are_packed_greedily_at_sentence_ends() -> None:
    text = TEXTS["latin"]
    chunks = split_text(text, encoding="o200k_base", max_tokens=400)
    counts = [count_text(chunk, "o200k_base") for chunk in chunks]
    # No sentence here is over 60 tokens, so only the last chunk may stop early.
    assert min(counts[:-1]) > 400 - 60
    assert all(chunk[-1] in ".?!" for chunk in chunks)


def test_paragraphs_that_fit_stay_whole() -> None:
    first = "First paragraph. It has two sentences."
    second = "Second paragraph, a single sentence."
    text = f"{first}\n\n{second}\n"
    budget = max(count_text(first, "o200k_base"), count_text(second, "o200k_base")) + 2
    assert split_text(text, encoding="o200k_base", max_tokens=budget) == [first, second]
    assert split_text(text, encoding="o200k_base", max_tokens=1000) == [text.strip()]


def test_empty_and_blank_text_give_no_chunks() -> None:
    assert split_text("", encoding="o200k_base", max_tokens=10) == []
    assert split_text(" \n\n\t ", encoding=None, max_tokens=10) == []


def test_special_token_text_is_ordinary() -> None:
    text = "Before. <|endoftext|> After."
    assert split_text(text, encoding="o200k_base", max_tokens=100) == [text]


def test_invalid_budgets_raise() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        split_text("text", encoding="o200k_base", max_tokens=0)
    with pytest.raises(ValueError, match="overlap_tokens"):
        split_text("text", encoding="o200k_base", max_tokens=10, overlap_tokens=10)
    with pytest.raises(ValueError, match="overlap_tokens"):
        split_text("text", encoding="o200k_base", max_tokens=10, overlap_tokens=-1)


def test_a_character_wider_than_the_budget_raises() -> None:
    wide = "\U0001d518"  # MATHEMATICAL FRAKTUR CAPITAL U: several byte-level tokens
    assert count_text(wide, "o200k_base") > 1
    with pytest.raises(ValueError, match="cannot hold"):
        split_text(f"a {wide} b", encoding="o200k_base", max_tokens=1)


def _pick(alphabet: str, count: int) -> str:
    return "".join(random.Random(count).choices(alphabet, k=count))


# One long tiktoken piece each, which encode_text cuts into segments (see chatjobs.tokens).
PATHOLOGICAL = {
    "repeated_letter": "b" * 200_000,
    "random_lowercase": _pick(string.ascii_lowercase, 200_000),
    "cjk_without_punctuation": _pick("".join(map(chr, range(0x4E00, 0x5000))), 60_000),
    "emoji": _pick("🚀🎉😀🇯🇵\u200d", 40_000),
    "spaces_then_words": " " * 150_000 + "end of the spaces. " * 100,
    "newline_run_in_prose": TEXTS["latin"][:20_000] + "\n" * 300_000 + TEXTS["latin"][:20_000],
}


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_overlong_runs_split_into_fitting_chunks_quickly(encoding: str, name: str) -> None:
    text = PATHOLOGICAL[name]
    started = time.process_time()
    chunks = split_text(text, encoding=encoding, max_tokens=2000, overlap_tokens=100)
    # Generous: about 0.2 s here; only an explosion (a superlinear path) should trip it.
    assert time.process_time() - started < 10
    assert_fits(chunks, encoding, 2000)
    without_overlap = split_text(text, encoding=encoding, max_tokens=2000)
    assert_fits(without_overlap, encoding, 2000)
    assert_reconstructs(text, without_overlap)
    # Every chunk brings text of its own: a whitespace run once gave one chunk per 2,000
    # newlines, each only the overlap taken from the last one.
    assert len(chunks) <= 2 * len(without_overlap)
