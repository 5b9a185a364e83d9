"""Splitting a long text into chunks that each fit a token budget."""

from __future__ import annotations

import bisect
import itertools
import math
import re
from typing import Protocol

from chatjobs.tokens import count_text, encode_text, get_encoding

__all__ = ["split_text"]

# Where a unit of text may end: after a blank-line run (paragraph), or after a sentence
# terminator. Latin and Arabic terminators need whitespace after them ("3.5", "e.g" stay
# whole); the full-width CJK ones do not, as CJK puts no space between sentences. Newlines
# after a terminator stay with its sentence and spaces go to the next one, which is where
# tiktoken's pre-tokenizer splits too, so the token counts of units add up to the count of
# their join almost exactly.
_CLOSERS = "\"'\u201d\u2019)\\]\u300d\u300f"
_BOUNDARY = re.compile(
    r"\n[^\S\n]*\n(?:[^\S\n]*\n)*"
    rf"|(?:[.!?\u061f][{_CLOSERS}]*(?=\s|\Z)|[\u3002\uff01\uff1f][{_CLOSERS}]*)(?:[^\S\n]*\n)*"
)
_WHITESPACE = re.compile(r"\s")
_TEXT = re.compile(r"\S")
# A line end followed by a line with text. Blank lines stay with the line before them: a run
# of newlines is then one stretch cut at token boundaries, not one unit per newline, each
# estimated at a token where o200k_base puts 16 newlines in one (chunks of a 1 MB newline run
# were then counted again and again as they grew by 2,000 newlines at a time).
_LINE_START = re.compile(r"\n(?=[^\S\n]*\S)")


def split_text(
    text: str, *, encoding: str | None, max_tokens: int, overlap_tokens: int = 0
) -> list[str]:
    """Split `text` into chunks of at most `max_tokens` tokens each, in order.

    Splits at paragraphs (blank lines), then sentences, then lines, and only a sentence that
    alone exceeds the budget at token boundaries (never inside a character). Chunks are packed
    greedily and each one is verified by counting it alone, as count_text(chunk, encoding)
    would, so BPE merges across a join can never push a chunk over. Chunks are slices of
    `text` stripped of surrounding whitespace: joined without overlap they give back `text`
    up to whitespace at the joins. With `overlap_tokens`, every chunk after the first starts
    with about that many tokens from the end of the previous one (cut at a sentence or word
    boundary when there is one), counted within `max_tokens`. `encoding` None uses
    count_text's estimate. ValueError if max_tokens < 1, overlap_tokens is not within
    0..max_tokens-1, or a single character is wider than max_tokens.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens must be >= 0 and < max_tokens ({max_tokens}), got {overlap_tokens}"
        )
    counter: _Counter = _Exact(encoding) if encoding else _Estimate()
    starts, counts = _units(text, counter, max_tokens - overlap_tokens)
    return _Packer(text, counter, starts, counts, max_tokens, overlap_tokens).run()


class _Counter(Protocol):
    def count(self, text: str) -> int:
        """Tokens of text, exactly as count_text counts them."""
        ...

    def tail(self, text: str, tokens: int) -> str:
        """A suffix of text of about `tokens` tokens, starting at a character boundary."""
        ...

    def pieces(self, text: str, limit: int) -> list[tuple[str, int]]:
        """text cut into consecutive (piece, count) of at most `limit` tokens each."""
        ...


class _Exact:
    def __init__(self, encoding: str) -> None:
        self.name = encoding
        self.encoding = get_encoding(encoding)
        # The last text counted, with its tokens: tail() is nearly always asked about the
        # chunk that was just verified, which saves encoding it twice.
        self._last: tuple[str, list[int]] = ("", [])

    def _tokens(self, text: str) -> list[int]:
        last_text, last_tokens = self._last
        if text is last_text or text == last_text:
            return last_tokens
        tokens = encode_text(text, self.name)
        self._last = (text, tokens)
        return tokens

    def count(self, text: str) -> int:
        return len(self._tokens(text))

    def tail(self, text: str, tokens: int) -> str:
        kept = self._tokens(text)[-tokens:]
        size = sum(len(piece) for piece in self.encoding.decode_tokens_bytes(kept))
        return _byte_suffix(text, size)

    def pieces(self, text: str, limit: int) -> list[tuple[str, int]]:
        data = _utf8(text)
        sizes = map(len, self.encoding.decode_tokens_bytes(encode_text(text, self.name)))
        offsets = [0, *itertools.accumulate(sizes)]
        last = len(offsets) - 1
        out: list[tuple[str, int]] = []
        start = token = 0
        while start < len(data):
            stop = min(token + limit, last)
            while True:
                end = _char_start(data, offsets[stop], back=True)
                if end <= start:
                    # One character spans more than `limit` tokens: it goes alone.
                    end = _char_start(data, start + 1, back=False)
                piece = data[start:end].decode("utf-8", "surrogatepass")
                # Re-encoding a slice can differ from the slice's length by a token or so, and
                # a chunk made of this piece alone is stripped: " word" is one token, "word"
                # may be two. Count whichever is more.
                count = max(self.count(piece), self.count(piece.strip()))
                if count <= limit or stop <= token + 1:
                    break
                # Back off by the excess, not one token: next to a cut (see encode_text) the
                # slice can be several tokens over, and each try encodes the whole piece.
                stop = max(token + 1, stop - (count - limit))
            out.append((piece, count))
            start = end
            token = bisect.bisect_left(offsets, start)
        return out


class _Estimate:
    def count(self, text: str) -> int:
        return count_text(text, None)

    def tail(self, text: str, tokens: int) -> str:
        return _byte_suffix(text, 3 * tokens)

    def pieces(self, text: str, limit: int) -> list[tuple[str, int]]:
        data = _utf8(text)
        out: list[tuple[str, int]] = []
        start = 0
        while start < len(data):
            end = _char_start(data, min(start + 3 * limit, len(data)), back=True)
            if end <= start:
                end = _char_start(data, start + 1, back=False)
            piece = data[start:end].decode("utf-8", "surrogatepass")
            out.append((piece, self.count(piece)))
            start = end
        return out


def _utf8(text: str) -> bytes:
    # surrogatepass so that any str round-trips and byte offsets map back to characters.
    return text.encode("utf-8", "surrogatepass")


def _char_start(data: bytes, index: int, *, back: bool) -> int:
    """The nearest UTF-8 character start at or before (back) or after `index`."""
    step = -1 if back else 1
    while 0 < index < len(data) and 0x80 <= data[index] < 0xC0:
        index += step
    return index


def _byte_suffix(text: str, size: int) -> str:
    data = _utf8(text)
    start = _char_start(data, max(0, len(data) - size), back=False)
    return data[start:].decode("utf-8", "surrogatepass")


def _units(text: str, counter: _Counter, limit: int) -> tuple[list[int], list[int]]:
    """Start offsets (plus len(text) last) and token counts of the units, each <= limit."""
    bounds = [0, *(m.end() for m in _BOUNDARY.finditer(text)), len(text)]
    starts: list[int] = []
    counts: list[int] = []
    for start, end in itertools.pairwise(bounds):
        if start == end:
            continue
        unit = text[start:end]
        count = counter.count(unit)
        if count <= limit:
            starts.append(start)
            counts.append(count)
            continue
        for offset, _, piece_count in _split_unit(unit, counter, limit):
            starts.append(start + offset)
            counts.append(piece_count)
    starts.append(len(text))
    return starts, counts


def _split_unit(unit: str, counter: _Counter, limit: int) -> list[tuple[int, str, int]]:
    """An over-budget unit as (offset, piece, count): at line ends, else token boundaries."""
    bounds = [0, *(match.end() for match in _LINE_START.finditer(unit)), len(unit)]
    lines = [unit[start:end] for start, end in itertools.pairwise(bounds)]
    out: list[tuple[int, str, int]] = []
    offset = 0
    for line in lines:
        count = counter.count(line) if len(lines) > 1 else None
        pieces = [(line, count)] if count is not None and count <= limit else None
        for piece, piece_count in pieces or counter.pieces(line, limit):
            out.append((offset, piece, piece_count))
            offset += len(piece)
    return out


class _Packer:
    """Greedy packing of units into chunks, each verified by counting it alone."""

    def __init__(
        self,
        text: str,
        counter: _Counter,
        starts: list[int],
        counts: list[int],
        max_tokens: int,
        overlap_tokens: int,
    ) -> None:
        self.text, self.counter = text, counter
        self.starts, self.counts = starts, counts
        self.max_tokens, self.overlap_tokens = max_tokens, overlap_tokens

    def run(self) -> list[str]:
        chunks: list[str] = []
        first = 0
        overlap: tuple[int, int] | None = None  # (offset in text, tokens)
        while first < len(self.counts):
            fitted = self._fill(first, overlap)
            while fitted is None and overlap is not None:
                # The overlap is best effort, progress is not: halve it until the chunk fits.
                overlap = self._overlap(chunks[-1], self.starts[first], overlap[1] // 2)
                fitted = self._fill(first, overlap)
            if fitted is None:
                # Alone the unit fits only with its surrounding whitespace, which chunks lose
                # (" Word" can be one token and "Word" two): cut it finer and try again.
                self._resplit(first)
                continue
            end, chunk = fitted
            # Only whitespace after the overlap: the chunk would repeat the last one's end.
            fresh = _TEXT.search(self.text, self.starts[first], self.starts[end])
            first = end
            if fresh is None:
                continue
            chunks.append(chunk)
            if first < len(self.counts):
                overlap = self._overlap(chunk, self.starts[first], self.overlap_tokens)
        return chunks

    def _resplit(self, index: int) -> None:
        """Replace unit `index` by its whitespace and its core cut into smaller pieces."""
        start, end = self.starts[index], self.starts[index + 1]
        unit = self.text[start:end]
        core = unit.strip()
        lead = len(unit) - len(unit.lstrip())
        count = self.counter.count(core)
        pieces = self.counter.pieces(core, min(count - 1, self.max_tokens - self.overlap_tokens))
        if len(pieces) < 2:
            raise ValueError(
                f"max_tokens={self.max_tokens} cannot hold {core!r}, which alone is {count} tokens"
            )
        starts, counts = [], []
        if lead:
            starts.append(start)
            counts.append(self.counter.count(unit[:lead]))
        position = start + lead
        for piece, piece_count in pieces:
            starts.append(position)
            counts.append(piece_count)
            position += len(piece)
        if position < end:
            starts.append(position)
            counts.append(self.counter.count(self.text[position:end]))
        self.starts[index : index + 1] = starts
        self.counts[index : index + 1] = counts

    def _fill(self, first: int, overlap: tuple[int, int] | None) -> tuple[int, str] | None:
        """(end unit, chunk) of the fullest verified chunk from unit `first`, or None."""
        start = overlap[0] if overlap else self.starts[first]
        # At least one unit, even over the estimate: stripped, it may fit (or be empty).
        end = max(self._extend(first, overlap[1] if overlap else 0), first + 1)
        fitted: tuple[int, str] | None = None
        while end > first:
            chunk = self.text[start : self.starts[end]].strip()
            tokens = self.counter.count(chunk)
            if tokens <= self.max_tokens:
                fitted = (end, chunk)
                further = self._extend(end, tokens)
                if further == end:
                    break
                end = further
            elif fitted is not None:
                break  # growing past the estimate overshot: keep the last fit
            else:
                # Drop enough units to cover the excess, at least one.
                excess, drop = tokens - self.max_tokens, 0
                while end - drop > first + 1 and excess > 0:
                    drop += 1
                    excess -= self.counts[end - drop]
                if drop == 0:
                    return None
                end -= drop
        return fitted

    def _extend(self, end: int, used: int) -> int:
        """The unit index reached by adding units after `end` to `used` tokens, by estimate."""
        counts, units = self.counts, len(self.counts)
        while end < units and used + counts[end] <= self.max_tokens:
            used += counts[end]
            end += 1
        return end

    def _overlap(self, chunk: str, chunk_end: int, wanted: int) -> tuple[int, int] | None:
        """(offset, tokens) of the overlap of at most `wanted` tokens taken from `chunk`."""
        if wanted <= 0:
            return None
        tail = self.counter.tail(chunk, wanted)
        tail = _word_aligned(chunk, tail)
        tokens = self.counter.count(tail)
        while tail and tokens > wanted:
            # Re-encoding the tail alone gave more tokens than it had inside the chunk.
            cut = _WHITESPACE.search(tail, 1)
            tail = tail[cut.start() if cut else 1 :].lstrip()
            tokens = self.counter.count(tail)
        if not tail:
            return None
        # The chunk was stripped, so in the text it ends before the whitespace at chunk_end,
        # at the last occurrence of its last character: rfind skips a long run of whitespace
        # at C speed, where stepping back a character at a time made chunking quadratic.
        end = self.text.rfind(chunk[-1], 0, chunk_end) + 1
        return end - len(tail), tokens


def _word_aligned(chunk: str, tail: str) -> str:
    """tail moved forward to a sentence or word start if one lies in its first half."""
    before = chunk[len(chunk) - len(tail) - 1] if len(tail) < len(chunk) else " "
    if before.isspace() or tail[:1].isspace():
        return tail.lstrip()
    half = math.ceil(len(tail) / 2)
    sentence = _BOUNDARY.search(tail, 0, half)
    if sentence is not None and sentence.end() < len(tail):
        return tail[sentence.end() :].lstrip()
    space = _WHITESPACE.search(tail, 0, half)
    if space is not None:
        return tail[space.start() :].lstrip()
    return tail
