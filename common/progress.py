"""Progress of long target work as plain lines: count, rate and ETA every ~10 s, to a terminal or a log alike.

Why not a progress bar: bars redraw one line with carriage returns, which a log file, `tee`, CI or Ray's forwarded
actor output turn into one unreadable line or nothing until the end. A newcomer watching `make run` must be able
to tell a slow run from a hung one, so long work (the target writing or reading text) prints a line at a fixed
interval wherever its output goes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`update(n)` as work is done; a line every `every_s` seconds while it runs and one when it ends (only when
    the work took longer than `every_s`: short work stays quiet)."""

    def __init__(
        self, what: str, total: float, unit: str, log: Callable[[str], None] | None = None, every_s: float = 10.0
    ):
        self.what, self.total, self.unit = what, float(total), unit
        self.log = log or _log_stderr
        self.every_s = every_s
        self.done = 0.0
        self.t0 = self.last = time.perf_counter()
        self.printed = False

    def update(self, n: float) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.printed = True
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        el = (now or time.perf_counter()) - self.t0
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = _duration(eta) if eta != float("inf") else "?"
        return f"{self.what}: {self.done:,.0f}/{self.total:,.0f} {self.unit}, {rate:,.0f} {self.unit}/s, ETA {eta_s}"

    def close(self) -> None:
        el = time.perf_counter() - self.t0
        if self.printed or el >= self.every_s:
            rate = self.done / el if el > 0 else 0.0
            self.log(f"{self.what}: {self.done:,.0f} {self.unit} in {_duration(el)} ({rate:,.0f} {self.unit}/s)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
