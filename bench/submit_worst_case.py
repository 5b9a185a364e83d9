"""Worst-case submit: count and POST /v1/jobs times for ~10 MiB bodies of pathological content.

    .venv/bin/python bench/submit_worst_case.py [--sizes 9.9,10] [--cases repeated_char,...]
        [--models gpt-4,gpt-4.1] [--repeat 1] [--before] [--no-api]

For each content kind and body size (MiB; the API's limit, CHATJOBS_MAX_BODY_BYTES, is 10 MiB),
builds a POST /v1/jobs body of exactly that many bytes whose one user message is that content,
then measures:

- count: CPU seconds of count_messages on the request in this process, for the encoding of
  each model (the linear-time guarded count of chatjobs.tokens), and of upper_bound_tokens;
- before (--before): CPU seconds of tiktoken's own encode_ordinary on the content, in a
  subprocess with a 120 s limit (a long run of spaces makes it panic);
- submit: wall seconds of POST /v1/jobs through a real stack (bench/stack.py: api only, no
  worker, so the figure is the API's alone) for each model, with the CPU seconds the API
  process and Postgres spent on it. gpt-4 has an 8,192-token window, gpt-4.1 1,047,576.

The best of --repeat runs is kept. Prints one table (tab-separated with --tsv).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, running_stack
from chatjobs.tokens import count_messages, get_encoding, lookup_model, upper_bound_tokens

MIB = 1024 * 1024
_PROSE = (
    "Durable jobs outlive the process that started them. Each job is stored before it is "
    "queued, so a crash between the two loses nothing; a sweeper finds jobs that were never "
    "queued and queues them again. Retries wait longer each time, up to a cap. "
)


def _random_ascii(alphabet: str, size: int, seed: int) -> str:
    # randbytes + translate builds 10 MB in milliseconds, where random.choices takes seconds.
    table = bytes(ord(alphabet[b % len(alphabet)]) for b in range(256))
    return random.Random(seed).randbytes(size).translate(table).decode("ascii")


def _random_chars(first: int, last: int, count: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(map(chr, (rng.randint(first, last) for _ in range(count))))


# name -> content whose JSON string (ensure_ascii=False, without quotes) is at most `size` bytes.
CASES: dict[str, Callable[[int], str]] = {
    "repeated_char": lambda size: "a" * size,
    "random_lowercase": lambda size: _random_ascii(string.ascii_lowercase, size, 1),
    "random_alnum": lambda size: _random_ascii(string.ascii_letters + string.digits, size, 2),
    "cjk": lambda size: _random_chars(0x4E00, 0x9FFF, size // 3, 3),
    "emoji": lambda size: _random_chars(0x1F300, 0x1F64F, size // 4, 4),
    "punctuation": lambda size: _random_ascii("!#$%&()*+,-./:;<=>?@[]^_{|}~", size, 5),
    "spaces": lambda size: " " * size,
    "newlines": lambda size: "\n" * (size // 2),  # "\n" is 2 bytes of JSON
    "prose": lambda size: _PROSE * (size // len(_PROSE)),
    "json_escapes": lambda size: '"\n' * (size // 4),  # '\"\n' is 4 bytes of JSON
}


def build_body(case: str, model: str, size: int) -> tuple[bytes, str]:
    """A POST /v1/jobs body of exactly `size` bytes, and its message content."""

    def body(content: str) -> bytes:
        request = {"model": model, "messages": [{"role": "user", "content": content}]}
        return json.dumps({"request": request}, ensure_ascii=False).encode()

    room = size - len(body(""))
    content = CASES[case](room)
    # Pad with plain letters to the exact size: a few bytes at most, after the content.
    content += "x" * (size - len(body(content)))
    data = body(content)
    assert len(data) == size, (case, len(data), size)
    return data, content


_BEFORE_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from chatjobs.tokens import get_encoding
encoding = get_encoding({encoding!r})
text = sys.stdin.read()
started = time.process_time()
try:
    encoding.encode_ordinary(text)
    print(f"{{time.process_time() - started:.2f}}")
except BaseException as exc:
    print(type(exc).__name__)
"""


def before(content: str, encoding: str, timeout: float = 120) -> str:
    """tiktoken's own encode_ordinary on content, in a subprocess: CPU seconds, or what broke."""
    script = _BEFORE_SCRIPT.format(
        root=str(Path(__file__).resolve().parent.parent), encoding=encoding
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=content,
            capture_output=True,
            text=True,
            timeout=timeout,
            encoding="utf-8",
            errors="surrogatepass",
        )
    except subprocess.TimeoutExpired:
        return f">{timeout:.0f}"
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def count_seconds(content: str, model: str, repeat: int) -> tuple[float, int]:
    spec = lookup_model(model)
    messages = [{"role": "user", "content": content}]
    best, tokens = float("inf"), 0
    for _ in range(repeat):
        started = time.process_time()
        tokens = count_messages(messages, spec).tokens
        best = min(best, time.process_time() - started)
    return best, tokens


def bound_seconds(content: str) -> float:
    started = time.process_time()
    upper_bound_tokens([{"role": "user", "content": content}])
    return time.process_time() - started


def submit(
    client: httpx.Client, stack: Stack, data: bytes, repeat: int
) -> tuple[int, float, float, float]:
    """(status, wall seconds, API and Postgres CPU seconds) of the fastest POST of data."""
    best = (0, float("inf"), 0.0, 0.0)
    for _ in range(repeat):
        cpu = stack.cpu_seconds()
        started = time.perf_counter()
        response = client.post("/v1/jobs", content=data)
        wall = time.perf_counter() - started
        used = stack.cpu_seconds()
        if wall < best[1]:
            api, postgres = (used[k] - cpu[k] for k in ("api", "postgres"))
            best = (response.status_code, wall, api, postgres)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="9.9,10", help="body sizes in MiB")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--models", default="gpt-4,gpt-4.1")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--before", action="store_true", help="also time raw tiktoken")
    parser.add_argument("--no-api", action="store_true", help="counts only, no stack")
    parser.add_argument("--tsv", action="store_true")
    ns = parser.parse_args()
    sizes = [round(float(s) * MIB) for s in ns.sizes.split(",")]
    cases = ns.cases.split(",")
    models = ns.models.split(",")
    for model in models:
        get_encoding(lookup_model(model).encoding or "o200k_base")  # loading is not counting

    columns = ["case", "MiB", "bound_s"]
    for model in models:
        columns += [f"count_{model}_s", f"tokens_{model}"]
        if ns.before:
            columns.append(f"tiktoken_{model}_s")
    if not ns.no_api:
        for model in models:
            columns += [f"submit_{model}", f"wall_{model}_s", "api_cpu_s", "pg_cpu_s"]
    rows: list[list[str]] = []

    def emit(row: list[str]) -> None:
        rows.append(row)
        print(("\t" if ns.tsv else "  ").join(row), flush=True)

    def measure(client: httpx.Client | None, stack: Stack | None) -> None:
        emit(columns)
        for case in cases:
            for size in sizes:
                row = [case, f"{size / MIB:.1f}"]
                bodies = {model: build_body(case, model, size) for model in models}
                row.append(f"{bound_seconds(bodies[models[0]][1]):.3f}")
                for model in models:
                    seconds, tokens = count_seconds(bodies[model][1], model, ns.repeat)
                    row += [f"{seconds:.2f}", str(tokens)]
                    if ns.before:
                        encoding = lookup_model(model).encoding or "o200k_base"
                        row.append(before(bodies[model][1], encoding))
                if client is not None and stack is not None:
                    for model in models:
                        status, wall, api, pg = submit(client, stack, bodies[model][0], ns.repeat)
                        row += [str(status), f"{wall:.2f}", f"{api:.2f}", f"{pg:.2f}"]
                emit(row)

    if ns.no_api:
        measure(None, None)
        return
    with running_stack(workers=0, api_workers=1) as stack:
        headers = {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=600) as client:
            # The first request of each model loads its encoding: not part of any figure.
            for model in models:
                client.post("/v1/jobs", content=build_body("prose", model, 4096)[0])
            measure(client, stack)


if __name__ == "__main__":
    main()
