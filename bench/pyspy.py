"""Where a process's CPU goes, from py-spy: the functions that hold the samples.

A recording here samples only the thread holding the GIL (``--gil``, no ``--idle``): a
thread blocked on a socket, a lock or the GIL is not sampled, so the shares are of the
process's Python CPU time, not of wall time (bench/batch_e2e.py records ``--idle`` to see
what the threads wait for instead). py-spy is ``PY_SPY``, else ``py-spy`` on PATH, else the
one next to this Python.
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
    pid: int, out: Path, *, rate: int = 100, subprocesses: bool = False, gil: bool = True
) -> Iterator[None]:
    """Record ``pid`` (and its children, with ``subprocesses``) while the block runs, as
    py-spy's raw collapsed stacks in ``out``. With ``gil`` (the default) only the thread
    holding the GIL is sampled: on a loaded machine py-spy takes threads that are runnable
    but waiting for a CPU (in a socket read, say) for active ones, and for a process of many
    threads the GIL holder is where its Python CPU goes."""
    spy = binary()
    if spy is None:
        raise RuntimeError("py-spy not found (pip install py-spy, or PY_SPY=/path)")
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate)]
    argv += ["--nonblocking", "--output", str(out)]
    if subprocesses:
        argv.append("--subprocesses")
    if gil:
        argv.append("--gil")
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
    sample was taken (the innermost frame), ``ours`` chatjobs' own functions anywhere on the
    stack (api/, chatjobs/, worker/), ``packages`` the innermost frame's package."""

    samples: int
    own: list[tuple[str, int]]
    ours: list[tuple[str, int]]
    packages: list[tuple[str, int]]

    def table(self, title: str, rows: list[tuple[str, int]]) -> str:
        lines = [f"{title} ({self.samples} samples)"]
        for frame, n in rows:
            lines.append(f"  {n / max(1, self.samples) * 100:5.1f}%  {frame}")
        return "\n".join(lines)

    def report(self) -> str:
        return "\n".join(
            [
                self.table("own (innermost frame)", self.own),
                self.table("inclusive, chatjobs' functions", self.ours),
                self.table("own, by package", self.packages),
            ]
        )


_OURS = ("api/", "chatjobs/", "worker/")


def _function(frame: str) -> tuple[str, str]:
    """``name (path/to/file.py:123)`` -> (``name (path/to/file.py)``, path): lines merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    # Site-packages and the standard library by their package path only (celery/worker/...
    # stays celery's); chatjobs' own files from the checkout's root.
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            return f"{name} ({path.split(marker, 1)[1]})", path.split(marker, 1)[1]
    for ours in _OURS:
        if path.startswith(ours):
            break
        if path.startswith("/") and f"/{ours}" in path:  # py-spy shortens packages' paths
            path = ours + path.split(f"/{ours}", 1)[1]
            break
    return (f"{name} ({path})" if path else name), path


def _package(path: str) -> str:
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") or "?"


def summarise(raw: Path, *, top: int = 20, within: str | None = None) -> Profile:
    """The top functions of a raw recording; only stacks containing ``within``, if given."""
    total = 0
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    packages: Counter[str] = Counter()
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
        own[frames[-1][0]] += count
        packages[_package(frames[-1][1])] += count
        for frame, path in set(frames):
            if path.startswith(_OURS):
                ours[frame] += count
    return Profile(total, own.most_common(top), ours.most_common(top), packages.most_common(12))
