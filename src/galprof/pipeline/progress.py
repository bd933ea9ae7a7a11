"""A progress line for long runs: galaxies done, galaxies/s, ETA (and a log line now and then)."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]

log = logging.getLogger("galprof")


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts galaxies as batches finish.

    Parameters
    ----------
    total : galaxies to process in this run (those already finished excluded)
    done_before : galaxies finished by earlier runs (shown, not counted in the rate)
    bar : draw a self-overwriting line on ``stream`` (default: when it is a terminal)
    log_every : seconds between progress lines in the log
    """

    def __init__(self, total: int, done_before: int = 0, *, bar: bool | None = None, stream=None,
                 log_every: float = 60.0):
        self.total = total
        self.before = done_before
        self.done = 0
        self.flagged = 0
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.log_every = log_every
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self._width = 0

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else float("nan")

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        n_all = self.total + self.before
        frac = (self.done + self.before) / n_all if n_all else 1.0
        return (f"{self.done + self.before}/{n_all} galaxies ({100 * frac:.0f}%) | {rate:.2f} galaxies/s | "
                f"ETA {_clock(eta)} | flagged {self.flagged}")

    def update(self, n: int, flagged: int = 0) -> None:
        self.done += n
        self.flagged += flagged
        now = time.perf_counter()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            self.clear()
            log.info("%s", self.line())
        if self.bar:
            text = self.line()
            self.stream.write("\r" + text.ljust(self._width))
            self.stream.flush()
            self._width = len(text)

    def clear(self) -> None:
        """Erase the bar (before other output on the same stream)."""
        if self.bar and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def close(self) -> None:
        if self.bar and self._width:
            self.stream.write("\n")
            self.stream.flush()
