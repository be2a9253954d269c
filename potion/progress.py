"""Progress bars that suit where the output goes.

On a terminal: a tqdm bar. Anywhere else (a log file, CI, a pipe) tqdm would still write
a ``\\r`` update per refresh into one endless line, so there the same calls print a plain
line now and then instead: at every tenth of the total (without a total: after 1, 2, 4,
8, ... updates), at least every ``LINE_EVERY_S`` seconds, and once at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, TextIO

LINE_EVERY_S = 30.0


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, stream: TextIO | None = None):
    """A tqdm bar on a terminal, :class:`LineProgress` elsewhere; both are context
    managers with ``update``, ``set_postfix_str``, ``set_postfix``, ``close`` and iteration."""
    stream = stream if stream is not None else sys.stderr
    if enabled and _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=stream, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled, stream=stream)


class LineProgress:
    """tqdm's interface (the part Potion uses), printing whole lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
                 every_s: float = LINE_EVERY_S):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.n = 0
        self.postfix = ""
        self._t0 = time.monotonic()
        self._last_line_t = self._t0
        self._last_mark = 0
        self._closed = False
        self._printed_n: int | None = None
        self._printed_postfix = ""

    # -- tqdm's interface -----------------------------------------------------------
    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total:
            mark = int(10 * self.n / self.total)  # tenths of the total
        else:
            mark = self.n.bit_length()  # no total: lines at 1, 2, 4, 8, ... updates
        if mark > self._last_mark or now - self._last_line_t >= self.every_s:
            self._last_mark = max(mark, self._last_mark)
            self._line(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def write(self, s: str) -> None:
        if self.enabled:
            print(s, file=self.stream, flush=True)

    def close(self) -> None:
        """One closing line with the total ("in total"), unless the last line said all of it
        already: the end never reads as one more step of progress."""
        if self._closed:
            return
        self._closed = True
        if (self._printed_n, self._printed_postfix) == (self.n, self.postfix) or not self.enabled:
            return
        elapsed = time.monotonic() - self._t0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit} in total ({elapsed:.0f} s)" + (f" {self.postfix}" if self.postfix else "")
        self._printed_n, self._printed_postfix = self.n, self.postfix
        print(text, file=self.stream, flush=True)

    # -- output ---------------------------------------------------------------------
    def _line(self, now: float) -> None:
        self._last_line_t = now
        self._printed_n, self._printed_postfix = self.n, self.postfix
        if not self.enabled:
            return
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        elapsed = now - self._t0
        text = f"{self.desc}: {count} {self.unit} ({elapsed:.0f} s)"
        if self.postfix:
            text += f" {self.postfix}"
        print(text, file=self.stream, flush=True)
