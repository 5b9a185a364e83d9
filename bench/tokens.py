"""Token counting and chunking speed on a ~1,000,000-token (o200k_base) mixed document.

    .venv/bin/python bench/tokens.py [--tokens 1000000] [--max-tokens 8000] [--overlap 200]

Builds the document deterministically (English prose, Python code, Chinese and Japanese
paragraphs), loads the encoding outside the timing, then times count_text on the whole text
and split_text on it. Prints one line:
tokens=… bytes=… count_s=… chunk_s=… total_s=… MB_per_s=… chunks=…
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatjobs.chunking import split_text
from chatjobs.tokens import count_text, get_encoding

ENCODING = "o200k_base"

_WORDS = (
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
    "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "will", "more", "about", "can", "said", "up", "out", "them",
    "some", "could", "what", "into", "than", "time", "only", "other", "new", "people", "its",
    "system", "request", "worker", "queue", "job", "retry", "budget", "latency", "answer", "model",
    "window", "token", "chunk", "prompt", "durable", "process", "during", "between", "through",
    "before", "after", "under", "again", "further", "against", "because", "while", "where",
    "should", "every", "each", "those", "these", "most", "such", "however", "although",
    "therefore", "meanwhile", "database", "transaction", "isolation", "replica", "migration",
    "schema", "index", "vacuum", "checkpoint", "snapshot", "engineer", "operator", "customer",
    "tenant", "service", "upstream", "downstream", "deadline", "throughput", "capacity", "careful",
    "explicit", "measured", "reliable", "observable", "idempotent", "concurrent", "eventual",
    "consistent", "river", "mountain", "harbour", "village", "lantern", "orchard", "meadow",
    "whisper", "thunder", "autumn", "winter", "spring",
)  # fmt: skip
_NAMES = ["Alice", "Bob", "Postgres", "Redis", "Celery", "OpenAI", "London", "Tuesday"]
_CJK = (
    "我们在系统中处理大量的请求每个任务都需要可靠地完成数据库事务保证一致性"
    "日本語の文章はひらがなとカタカナと漢字を組み合わせて書かれます東京大阪京都"
)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 28))]
    if rng.random() < 0.3:
        words[rng.randrange(len(words))] = rng.choice(_NAMES)
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 99_999)))
    if len(words) > 10 and rng.random() < 0.5:
        words[rng.randrange(3, len(words) - 2)] += ","
    return " ".join(words).capitalize() + rng.choice(".....?!")


def _prose(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 8)))


def _code(rng: random.Random) -> str:
    name = "_".join(rng.choice(_WORDS) for _ in range(2))
    args = ", ".join(f"{rng.choice(_WORDS)}_{i}: int" for i in range(rng.randint(1, 4)))
    body = [f"def {name}({args}) -> dict[str, int]:", f'    """Return the {name} totals."""']
    body.append("    totals: dict[str, int] = {}")
    for i in range(rng.randint(2, 10)):
        key = rng.choice(_WORDS)
        body.append(f'    totals["{key}"] = totals.get("{key}", 0) + {rng.randint(1, 500)} * {i}')
    body.append("    return totals")
    return "\n".join(body)


def _cjk(rng: random.Random) -> str:
    sentences = (
        "".join(rng.choice(_CJK) for _ in range(rng.randint(10, 40)))
        + rng.choice("\u3002\u3002\uff01\uff1f")  # full-width . . ! ?
        for _ in range(rng.randint(2, 6))
    )
    return "".join(sentences)


def build_document(target_tokens: int, seed: int = 0) -> str:
    """A deterministic mixed document of about `target_tokens` o200k_base tokens."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    missing = target_tokens
    while missing > 0:
        # Paragraph counts add up to slightly more than the count of their join: top up.
        added = 0
        while added < missing:
            roll = rng.random()
            paragraph = _prose(rng) if roll < 0.75 else _code(rng) if roll < 0.9 else _cjk(rng)
            paragraphs.append(paragraph)
            added += count_text(paragraph, ENCODING)
        missing = target_tokens - count_text("\n\n".join(paragraphs), ENCODING)
    return "\n\n".join(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--overlap", type=int, default=200)
    ns = parser.parse_args()

    get_encoding(ENCODING)  # loading the ranks is a one-off per process, not counting work
    document = build_document(ns.tokens)
    size = len(document.encode("utf-8"))

    started = time.perf_counter()
    tokens = count_text(document, ENCODING)
    counted = time.perf_counter()
    chunks = split_text(
        document, encoding=ENCODING, max_tokens=ns.max_tokens, overlap_tokens=ns.overlap
    )
    chunked = time.perf_counter()

    assert all(count_text(chunk, ENCODING) <= ns.max_tokens for chunk in chunks)
    total = chunked - started
    print(
        f"tokens={tokens} bytes={size} count_s={counted - started:.3f} "
        f"chunk_s={chunked - counted:.3f} total_s={total:.3f} "
        f"MB_per_s={size / 1e6 / total:.1f} chunks={len(chunks)}"
    )


if __name__ == "__main__":
    main()
