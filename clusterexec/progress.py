"""Progress of a long `map`: ``ex.map(fn, items, progress=True)``.

Counts items as their tasks finish (in any order), not as the caller consumes results. Uses tqdm when it is
installed; otherwise one line on stderr, redrawn at most five times a second.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_bars: set[Any] = set()  # bars on screen now: task output is written above them, not through them


def start(total: int | None, description: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        bar: Any = LineProgress(total, description)
    else:
        bar = tqdm(total=total, desc=description, unit="task", smoothing=0.1)
    _bars.add(bar)
    return bar


def finish(bar: Any) -> None:
    _bars.discard(bar)
    bar.close()


@contextmanager
def output_above_bars() -> Iterator[None]:
    """Around writing task output: take the progress bars off the screen, then draw them again below."""
    if not _bars:
        yield
        return
    bars = list(_bars)
    tqdm_bars = [b for b in bars if not isinstance(b, LineProgress)]
    lines = [b for b in bars if isinstance(b, LineProgress)]
    for bar in lines:
        bar.clear()
    try:
        if tqdm_bars:
            with type(tqdm_bars[0]).external_write_mode():
                yield
        else:
            yield
    finally:
        for bar in lines:
            bar.redraw()


class LineProgress:
    """A minimal tqdm stand-in: `update(n)` from any thread, `close()` once."""

    def __init__(self, total: int | None, description: str, stream: Any = None, interval: float = 0.2):
        self.total = total
        self.description = description
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream)
        self.interval = interval if self.tty else max(interval, 10.0)  # a log file gets a line now and then
        self.n = 0
        self.started = time.monotonic()
        self._shown = 0.0
        self._drawn = -1  # the count last drawn
        self._lock = threading.Lock()
        self._closed = False

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            now = time.monotonic()
            if now - self._shown >= self.interval or (self.total is not None and self.n >= self.total):
                self._shown = now
                self._draw(now)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.n != self._drawn:
                self._draw(time.monotonic())
            if self.tty:
                self._write("\n")

    def clear(self) -> None:
        if self.tty:
            with self._lock:
                self._write("\r\x1b[K")

    def redraw(self) -> None:
        if self.tty:
            with self._lock:
                if not self._closed:
                    self._draw(time.monotonic())

    def _draw(self, now: float) -> None:
        self._drawn = self.n
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        if self.total:
            line = f"{self.description}: {self.n:,}/{self.total:,} ({100 * self.n / self.total:.0f}%)"
            if 0 < self.n < self.total and rate > 0:
                line += f" · {rate:,.1f}/s · {_eta((self.total - self.n) / rate)} left"
        else:
            line = f"{self.description}: {self.n:,} done · {rate:,.1f}/s"
        line += f" · {_eta(elapsed)} elapsed"
        self._write("\r" + line + "\x1b[K" if self.tty else line + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
