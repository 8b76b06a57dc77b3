"""Progress of long work, the same way everywhere: a tqdm bar on a terminal, plain lines elsewhere.

    bar = progress_bar(total=500, desc="stage 2", unit="step", enabled=True)
    bar.update(1); bar.set_postfix(loss="1.234"); bar.close()

Under CI, in a log file or in the demo's captured output, a tqdm bar becomes one long line of
carriage returns; there the same calls print one line at most every `LINE_INTERVAL_S` seconds
(and the last one), so a long stage is never silent and a log stays readable.
"""

from __future__ import annotations

import sys
import time

LINE_INTERVAL_S = 10.0


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0):
    """A tqdm bar when stderr is a terminal, `LineProgress` otherwise, None when disabled."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial)


class LineProgress:
    """The subset of tqdm's interface this project uses, written as plain lines to stderr."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, interval: float = LINE_INTERVAL_S,
                 stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.stream = interval, stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval or (self.total is not None and self.n >= self.total):
            self.last = now
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.total is None or self.n < self.total:  # the final state was not printed yet
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}s, {elapsed:.0f} s{rate}{extra}", file=self.stream, flush=True)
