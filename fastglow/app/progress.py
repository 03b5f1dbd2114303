"""Training progress on stderr: tqdm's bar on a terminal; whole lines elsewhere (a log file, a pipe), where
a bar's carriage returns would pile up into one giant line."""

from __future__ import annotations

import sys
import time


class ProgressLines:
    """The part of tqdm's interface the training loop uses (update, set_postfix_str, close), written as one
    line ``train: step t/T (p%) <postfix>, r steps/s`` at most every ``interval`` seconds and at the end."""

    def __init__(self, total: int, initial: int = 0, interval: float = 30.0, file=None):
        self.total, self.n, self.interval, self.file = total, initial, interval, file or sys.stderr
        self.postfix, self.written = "", initial
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.n != self.written:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        rate = (self.n - self.written) / max(now - self.last, 1e-9)
        percent = 100 * self.n / self.total if self.total else 100
        print(f"train: step {self.n}/{self.total} ({percent:.0f}%) {self.postfix}, {rate:.2f} steps/s".replace(
            " ,", ","), file=self.file, flush=True)
        self.last, self.written = now, self.n


def progress(total: int, initial: int, enabled: bool, file=None):
    """A tqdm bar when ``file`` (stderr) is a terminal, else :class:`ProgressLines`; nothing if not ``enabled``."""
    from tqdm import tqdm

    file = file or sys.stderr
    if enabled and not file.isatty():
        return ProgressLines(total, initial, file=file)
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=not enabled,
                mininterval=0.5, file=file)
