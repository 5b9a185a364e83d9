"""Batch ingest: upload an N-line batch file and time it to ``in_progress``; the API's memory.

    .venv/bin/python bench/batch_ingest.py [--lines 50000,5000] [--phases] [--profile]
                                           [--keep-profile DIR]

Each size runs on a fresh stack (private Postgres and Redis, the real api, beat; no worker,
so no line runs: the dispatcher's first window of released lines just waits in the broker).
After a 20-line warm-up batch it times the upload (POST /v1/files, openai SDK), POST
/v1/batches (answers ``validating``), and GET /v1/batches/{id} every 20 ms until
``in_progress``. Postgres then confirms the batch's job count. (The batch's own
``in_progress_at - created_at`` is printed too, but ``in_progress_at`` is now() of the
storing transaction, i.e. its start: it says when validation began, not when it ended.)
The API process's RSS is sampled from /proc every 5 ms, and its VmHWM read before and after.

``--phases`` runs, in this process, the validator's steps on the stored file, each timed:
reading it (chatjobs.files), splitting, json.loads, schema validation, the whole per-line
check, the cross-line checks, json.dumps, uuid7 + COPY row, and the COPY's end, into a
transaction rolled back at the end. ``--profile`` records the API process with py-spy
(``py-spy`` on PATH or PY_SPY=/path) during a second, untimed validation of the same file
and prints the validator thread's inclusive shares by frame.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import openai
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, cpu_delta, running_stack

MODEL = "gpt-4.1"
ENDPOINT: Final = "/v1/chat/completions"

_ROLES = (
    "a patient support agent for a regional bank",
    "a senior Python reviewer who cares about readability",
    "a travel planner who knows European rail networks",
    "a nutritionist writing for busy parents",
    "a contracts paralegal summarising clauses for engineers",
    "a high-school physics tutor",
    "a product copywriter for outdoor equipment",
    "an SRE writing incident summaries",
    "a museum guide specialising in the Dutch Golden Age",
    "a data analyst explaining dashboards to executives",
)
_RULES = (
    "Answer in plain English and keep it under 120 words.",
    "Use short bullet points; never invent facts you were not given.",
    "If the request is ambiguous, state your assumption in the first sentence.",
    "Quote figures exactly as given and name their units.",
    "Prefer concrete examples to general advice.",
)
_TASKS = (
    "Summarise the following note for a colleague who missed the meeting",
    "Classify the sentiment of this customer message and say why",
    "Rewrite this paragraph so that a twelve-year-old understands it",
    "List three risks in the plan below, most serious first",
    "Extract every date, amount and person named in this text",
    "Suggest a title and a two-sentence abstract for this draft",
)
_VOCABULARY = (
    "invoice quarterly migration latency customer warehouse Rotterdam shipment refund "
    "deadline budget contract renewal outage database replica Tuesday forecast margin "
    "onboarding ticket escalation carrier pallet audit compliance vendor roadmap sprint "
    "prototype feedback survey churn pricing discount loyalty itinerary Lisbon platform "
    "battery firmware recall inspection tariff schedule headcount training archive"
)
_WORDS = _VOCABULARY.split()


def request_body(rng: random.Random, *, max_tokens: int = 16) -> dict[str, Any]:
    """A realistic chat-completion body: a system and a user message of a few hundred bytes."""
    system = (
        f"You are {rng.choice(_ROLES)}. {rng.choice(_RULES)} {rng.choice(_RULES)} "
        f"Reference {rng.randrange(10**6):06d}; "
        f"the reader's time zone is UTC{rng.randint(-11, 12):+d}."
    )
    note = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(25, 60)))
    user = f"{rng.choice(_TASKS)}:\n\n{note.capitalize()}. Amount: {rng.randint(10, 99_999)} EUR."
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
    }


def batch_file(lines: int, *, seed: int = 0, prefix: str = "req") -> bytes:
    """A batch input file of ``lines`` distinct requests (custom_id ``{prefix}-{i}``)."""
    rng = random.Random(seed)
    return b"".join(
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": ENDPOINT,
                "body": request_body(rng),
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i in range(lines)
    )


def stop_on_signals() -> None:
    """SIGTERM, and SIGINT even in a background job (where the shell ignores it), end the run
    through its ``finally`` blocks, so the private Postgres and Redis are stopped too."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)


def sdk(stack: Stack) -> openai.OpenAI:
    """The official SDK pointed at the stack's API (no retries: a failure shows as one)."""
    return openai.OpenAI(
        base_url=f"{stack.api_url}/v1", api_key=stack.key, max_retries=0, timeout=600
    )


def api_pid(stack: Stack) -> int:
    popen = next(p.popen for p in stack.procs if p.name == "api")
    assert popen is not None
    return popen.pid


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Peak VmRSS of a process, sampled every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_status(
    client: openai.OpenAI, batch_id: str, leave: set[str], *, poll: float, timeout: float
) -> Any:
    """Poll the batch until its status is not in ``leave``; returns the Batch."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status not in leave:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout:.0f} s")
        time.sleep(poll)


@dataclass
class Ingest:
    """One file uploaded and made a batch; seconds of each step as the client saw them."""

    batch: Any
    upload_s: float
    create_answer_s: float
    to_in_progress_s: float


def ingest(
    client: openai.OpenAI,
    content: bytes,
    *,
    name: str = "batch.jsonl",
    after_upload: Callable[[], object] | None = None,
) -> Ingest:
    """Upload ``content``, create a batch of it and wait until it leaves ``validating``
    (polled every 20 ms). ``to_in_progress_s`` runs from the create to that status."""
    started = time.monotonic()
    uploaded = client.files.create(file=(name, content), purpose="batch")
    upload_s = time.monotonic() - started
    if after_upload is not None:
        after_upload()
    created = time.monotonic()
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
    )
    answer_s = time.monotonic() - created
    assert batch.status == "validating", batch.status
    batch = wait_status(client, batch.id, {"validating"}, poll=0.02, timeout=600)
    return Ingest(batch, upload_s, answer_s, time.monotonic() - created)


def stored_lines(database_url: str, batch_id: str) -> tuple[int, float]:
    """(jobs stored for the batch, the server's created_at -> in_progress_at in seconds)."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as conn:
        count = conn.scalar(text("SELECT count(*) FROM jobs WHERE batch_id = :b"), {"b": batch_id})
        server = conn.scalar(
            text(
                "SELECT extract(epoch FROM in_progress_at - created_at) FROM batches WHERE id = :b"
            ),
            {"b": batch_id},
        )
    engine.dispose()
    return int(count or 0), float(server or 0)


# --- where the time goes ---------------------------------------------------------------------


def phases(file_id: str) -> dict[str, float]:
    """Seconds per step of the API's validator, run here on the stored file ``file_id``: the
    same functions (chatjobs.files, chatjobs.batches.lines) and the same COPY, streamed as the
    validator streams, in a transaction rolled back at the end. ``parse`` is the whole
    per-line check; ``json_loads`` and ``schema`` time its two main steps again, apart."""
    from chatjobs import files
    from chatjobs.batches import lines as batch_lines
    from chatjobs.batches.service import _COPY_COLUMNS
    from chatjobs.db import session_scope
    from chatjobs.models import StoredFile, uuid7
    from chatjobs.schemas import ChatCompletionRequest
    from chatjobs.settings import get_settings

    settings = get_settings()
    checker = batch_lines.Checker(max_lines=10**9, default_model=settings.default_model)
    clock = time.perf_counter
    names = ("read_file", "split", "json_loads", "schema", "parse", "checker", "json_dumps")
    totals = dict.fromkeys((*names, "uuid7_write_row", "copy_end"), 0.0)

    def timed_chunks(source: StoredFile) -> Iterator[bytes]:
        chunks = files.open_content(source)
        while True:
            started = clock()
            chunk = next(chunks, None)
            totals["read_file"] += clock() - started
            if chunk is None:
                return
            yield chunk

    with session_scope() as session:
        source = session.get_one(StoredFile, file_id)
        session.expunge(source)
        cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY jobs ({_COPY_COLUMNS}) FROM STDIN") as copy:
            split = batch_lines.split_lines(timed_chunks(source), settings.max_body_bytes)
            while True:
                t0 = clock()
                item = next(split, None)
                if item is None:
                    break
                number, raw = item
                assert raw is not None
                t1 = clock()
                data = json.loads(raw)
                t2 = clock()
                ChatCompletionRequest.model_validate(data["body"])
                t3 = clock()
                line = batch_lines.parse(
                    number, raw, endpoint=ENDPOINT, max_line=settings.max_body_bytes
                )
                t4 = clock()
                assert isinstance(line, batch_lines.Line)
                checker.check(line)
                t5 = clock()
                dumped = json.dumps(line.body, ensure_ascii=False, separators=(",", ":"))
                t6 = clock()
                copy.write_row(_phase_row(uuid7(), source.tenant_id, dumped, line.custom_id))
                t7 = clock()
                for name, seconds in zip(
                    ("split", *names[2:], "uuid7_write_row"),
                    (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6),
                    strict=True,
                ):
                    totals[name] += seconds
            ended = clock()
        totals["copy_end"] = clock() - ended
        totals["split"] -= totals["read_file"]  # split_lines pulls the chunks
        session.rollback()
    return totals


def _phase_row(job_id: object, tenant: object, request: str, custom_id: str) -> tuple[Any, ...]:
    # The validator's row (chatjobs.batches.service._COPY_COLUMNS), for a batch of its own.
    return (
        job_id,
        tenant,
        "queued",
        MODEL,
        request,
        True,  # needs_plan
        0,  # priority
        "phases",  # queue
        0,  # attempts
        0,  # claim_seq
        6,  # max_attempts
        "2100-01-01T00:00:00Z",  # deadline
        0,
        0,
        0,  # tokens
        "batch_phases",
        custom_id,
        True,  # held
    )


def py_spy_binary() -> str | None:
    return os.environ.get("PY_SPY") or shutil.which("py-spy")


@contextmanager
def py_spy_record(pid: int, out: Path, *, rate: int = 200) -> Iterator[None]:
    """Record ``pid`` with py-spy (raw collapsed stacks, idle frames too) while the block runs."""
    binary = py_spy_binary()
    assert binary is not None
    spy = subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--idle",
            "--threads",
            "--rate",
            str(rate),
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


# Frames whose inclusive share of the validator thread's samples is reported, in this order
# (name, frame, and frames the stack must also hold).
_PROFILE_FRAMES = (
    ("store_lines", "_store_lines (chatjobs/batches/service.py"),
    ("read_file", "_chunks (chatjobs/batches/service.py"),
    ("read_file_wait", "Connection.wait (psycopg/connection.py", "_chunks ("),
    ("split_lines", "split_lines (chatjobs/batches/lines.py"),
    ("parse", "parse (chatjobs/batches/lines.py"),
    ("json_loads", "loads (json/__init__.py"),
    ("schema", "model_validate ("),
    ("checker", "check (chatjobs/batches/lines.py"),
    ("json_dumps", "dumps (json/__init__.py"),
    ("uuid7", "uuid7 (chatjobs/models.py"),
    ("copy_write_row", "write_row ("),
    ("copy_end", "Copy.__exit__ (psycopg/_copy.py"),
    ("commit", "Session.commit ("),
)


def profile_shares(raw: Path) -> tuple[int, dict[str, float], list[tuple[str, float]]]:
    """(validator samples, share per phase frame, top self frames) from py-spy's raw output."""
    total = 0
    phase: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for row in raw.read_text().splitlines():
        stack, _, count_text = row.rpartition(" ")
        if "_validate_logged (" not in stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for name, marker, *within in _PROFILE_FRAMES:
            if any(marker in frame for frame in frames) and all(w in stack for w in within):
                phase[name] += count
        self_time[frames[-1].split(" (")[0] + " " + frames[-1].split("/")[-1]] += count
    if not total:
        return 0, {}, []
    shares = {name: phase[name] / total for name, *_ in _PROFILE_FRAMES}
    top = [(frame, n / total) for frame, n in self_time.most_common(12)]
    return total, shares, top


# --- the run ---------------------------------------------------------------------------------


def run(lines: int, *, profile: bool, with_phases: bool, keep: Path | None = None) -> None:
    content = batch_file(lines)
    with running_stack(workers=0) as stack:
        client = sdk(stack)
        pid = api_pid(stack)
        warm = ingest(client, batch_file(20, seed=1, prefix="warm"), name="warm.jsonl")
        assert warm.batch.status == "in_progress", warm.batch
        time.sleep(0.5)
        rss_before = _status_kb(pid, "VmRSS")
        hwm_before = _status_kb(pid, "VmHWM")
        marks: dict[str, Any] = {"cpu_start": stack.cpu_seconds()}
        with RssSampler(pid) as sampler:

            def uploaded() -> None:
                marks["cpu_upload"], marks["upload_peak"] = stack.cpu_seconds(), sampler.peak_kb

            done = ingest(client, content, after_upload=uploaded)
        cpu_end = stack.cpu_seconds()
        batch = done.batch
        count, server_s = stored_lines(stack.database_url, batch.id)
        hwm_after = _status_kb(pid, "VmHWM")
        mib = len(content) / 2**20
        print(
            f"batch_ingest lines={lines} file_mib={mib:.1f} status={batch.status} "
            f"jobs_in_postgres={count} total_s={done.upload_s + done.to_in_progress_s:.2f} "
            f"upload_s={done.upload_s:.2f} create_answer_s={done.create_answer_s:.3f} "
            f"create_to_in_progress_s={done.to_in_progress_s:.2f} "
            f"db_in_progress_at_minus_created_at_s={server_s:.2f} "
            f"lines_per_s={lines / done.to_in_progress_s:.0f} "
            f"api_rss_before_mib={rss_before / 1024:.0f} "
            f"api_rss_peak_upload_mib={marks['upload_peak'] / 1024:.0f} "
            f"api_rss_peak_mib={sampler.peak_kb / 1024:.0f} "
            f"api_vmhwm_before_mib={hwm_before / 1024:.0f} "
            f"api_vmhwm_after_mib={hwm_after / 1024:.0f}",
            flush=True,
        )
        if batch.status != "in_progress":
            print(f"  errors: {batch.errors}", flush=True)
        print(f"  cpu upload:   {cpu_delta(marks['cpu_start'], marks['cpu_upload'])}", flush=True)
        print(f"  cpu validate: {cpu_delta(marks['cpu_upload'], cpu_end)}", flush=True)
        if with_phases:
            steps = phases(batch.input_file_id)
            print(
                "  phases (in-process, same functions): "
                + " ".join(f"{k}={v:.2f}s" for k, v in steps.items()),
                flush=True,
            )
        if profile:
            _profiled(client, pid, batch.input_file_id, lines, keep)


def _profiled(client: openai.OpenAI, pid: int, file_id: str, lines: int, keep: Path | None) -> None:
    """Validate the same file again (a second batch, untimed) under py-spy."""
    if py_spy_binary() is None:
        print("  profile: py-spy not found (pip install py-spy, or PY_SPY=/path)", flush=True)
        return
    # The first batch's lines still count as queued; the tenant has no queue limit here.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.txt"
        with py_spy_record(pid, out):
            started = time.monotonic()
            batch = client.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h"
            )
            batch = wait_status(client, batch.id, {"validating"}, poll=0.05, timeout=600)
            elapsed = time.monotonic() - started
        samples, shares, top = profile_shares(out)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, keep / f"api-validate-{lines}.txt")
    print(
        f"  profile: {lines} lines {batch.status} in {elapsed:.2f}s under py-spy "
        f"(200 Hz, {samples} validator-thread samples); inclusive shares: "
        + " ".join(f"{k}={v:.0%}" for k, v in shares.items()),
        flush=True,
    )
    print("  profile top self: " + "; ".join(f"{f} {s:.0%}" for f, s in top), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="50000,5000", help="comma-separated file sizes")
    parser.add_argument("--phases", action="store_true", help="time the validator's steps")
    parser.add_argument("--profile", action="store_true", help="py-spy the API's validation")
    parser.add_argument("--keep-profile", type=Path, help="directory for py-spy's raw stacks")
    ns = parser.parse_args()
    stop_on_signals()
    for lines in [int(n) for n in ns.lines.split(",")]:
        run(lines, profile=ns.profile, with_phases=ns.phases, keep=ns.keep_profile)


if __name__ == "__main__":
    main()
