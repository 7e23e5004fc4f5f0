"""Progress lines for long jobs: steps done / total, a rate and an ETA, on stderr.

One line is rewritten in place (``\\r``) at most every ``every`` seconds and ended
with a newline at the last step, e.g.::

    [ntk_dist] tiles 12/40 | 1,530,000 kernel entries/s | ETA 0:00:31
    [ntk_dist] cholesky block columns 3/16 | 2.1 GFLOP/s | ETA 0:00:05

The rate counts only the work of this run (a resumed job does not count what an
earlier run did). The ETA divides the work left by that rate; the work left is
``work_left(done)`` when steps differ in cost (the columns of a Cholesky), otherwise
the mean work of the steps so far times the steps left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["ProgressReporter", "format_hms"]


def format_hms(seconds: float) -> str:
    """``h:mm:ss`` of a duration in seconds."""
    s = int(round(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _format_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class ProgressReporter:
    """Steps done of ``total`` with the rate of ``unit`` per second and an ETA.

    Args:
      what: what a step is, printed before the count (``"tiles"``).
      total: the number of steps of the whole job.
      unit: the unit of the work each step reports (``"kernel entries"``).
      done: steps already finished before this run (a resumed job).
      enabled: print nothing when False (the counts are still kept).
      every: seconds between two printed lines (the last step is always printed).
      work_left: the work of the steps from ``done`` on, when steps differ in cost.
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        *,
        done: int = 0,
        enabled: bool = True,
        every: float = 1.0,
        work_left: Callable[[int], float] | None = None,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.done, self.enabled, self.every = done, enabled, every
        self.work_left = work_left
        self.start = time.perf_counter()
        self.work = 0.0  # the work of this run's steps
        self.computed = 0  # steps finished by this run
        self.last = 0.0

    def update(self, work: float, steps: int = 1) -> None:
        """Record ``steps`` more steps done, which took ``work`` units; maybe print a line."""
        self.done += steps
        self.computed += steps
        self.work += work
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            if self.work_left is not None:
                left = self.work_left(self.done)
            else:
                left = self.work / self.computed * (self.total - self.done)
            eta = elapsed / self.work * left if self.work > 0 else 0.0
            end = "\n" if self.done >= self.total else ""
            print(
                f"\r[ntk_dist] {self.what} {self.done}/{self.total} | "
                f"{_format_rate(self.work / elapsed)} {self.unit}/s | ETA {format_hms(eta)}",
                end=end,
                file=sys.stderr,
                flush=True,
            )

    def note(self, message: str) -> None:
        """Print ``message`` on its own line (if enabled)."""
        if self.enabled:
            print(f"[ntk_dist] {message}", file=sys.stderr, flush=True)
