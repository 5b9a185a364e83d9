"""Where a process's CPU goes, from py-spy: the functions that hold the samples.

A recording here takes only active samples (no ``--idle``): a thread blocked on a socket, a
lock or the GIL is not sampled, so the shares are of CPU time, not of wall time (bench/
batch_e2e.py records ``--idle`` to see what the threads wait for instead). py-spy is
``PY_SPY``, else ``py-spy`` on PATH, else the one next to this Python.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return (
        os.environ.get("PY_SPY")
        or shutil.which("py-spy")
        or (str(beside) if beside.exists() else None)
    )


@contextmanager
def cpu_profile(
    pid: int, out: Path, *, rate: int = 100, subprocesses: bool = False
) -> Iterator[None]:
    """Record ``pid`` (and its children, with ``subprocesses``) while the block runs, as
    py-spy's raw collapsed stacks in ``out``."""
    spy = binary()
    if spy is None:
        raise RuntimeError("py-spy not found (pip install py-spy, or PY_SPY=/path)")
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate)]
    argv += ["--nonblocking", "--output", str(out)]
    if subprocesses:
        argv.append("--subprocesses")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@dataclass(frozen=True)
class Profile:
    """Samples of a recording, and the functions holding the most of them: ``own`` where the
    sample was taken (the innermost frame), ``inclusive`` anywhere on the stack."""

    samples: int
    own: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]

    def table(self, title: str, rows: list[tuple[str, int]]) -> str:
        lines = [f"{title} ({self.samples} samples)"]
        for frame, n in rows:
            lines.append(f"  {n / max(1, self.samples) * 100:5.1f}%  {frame}")
        return "\n".join(lines)


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (path/to/file.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    # Site-packages and the standard library by their package path only.
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def summarise(raw: Path, *, top: int = 20, within: str | None = None) -> Profile:
    """The top functions of a raw recording; only stacks containing ``within``, if given."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for row in raw.read_text().splitlines():
        stack, _, count_text = row.rpartition(" ")
        if not stack or (within is not None and within not in stack):
            continue
        count = int(count_text)
        frames = [
            _function(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Profile(total, own.most_common(top), inclusive.most_common(top))
