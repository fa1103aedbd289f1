"""How a long job shows its progress: the one rule for bar, plain lines or silence, and `--quiet`.

On a terminal a tqdm bar redraws itself in place with carriage returns. In a pipe or a file those
redraws pile up as one endless line, so there progress is a plain line every `LINE_EVERY_FRACTION`
of the job or every `LINE_EVERY_SECONDS`, with the bar's own figures (count, rate, remaining time
and the caller's postfix, such as the loss). `--quiet` shows no progress and no running log: a
command then prints only its closing line (stdout) and its errors and warnings (stderr).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from igpt.config import option

BAR, LINES, QUIET = "bar", "lines", "quiet"
LINE_EVERY_FRACTION = 0.1
LINE_EVERY_SECONDS = 30.0
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
OPEN_LINE_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no total: no percentage, no remaining time


def style(quiet: bool = False, stream: TextIO | None = None) -> str:
    """QUIET when asked, BAR when `stream` (default: stderr, where progress goes) is a terminal, else LINES."""
    if quiet:
        return QUIET
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return BAR if isatty is not None and isatty() else LINES


@dataclass(kw_only=True)
class OutputOptions:
    """The `--quiet` flag of every command that shows progress."""

    quiet: bool = option(False, "for scripts: no progress and no running log, only the closing line and errors")

    @property
    def progress(self) -> bool:
        """Whether the pipeline shows progress at all (a bar or lines: `progress_bar` picks)."""
        return not self.quiet

    @property
    def log(self) -> Callable[[str], None]:
        """The pipeline's running log: each line printed at once (in order with the progress lines, in a file that
        is being followed), or nothing when quiet."""
        return say if self.progress else _silent


def say(text: str) -> None:
    print(text, flush=True)


def _silent(_text: str) -> None:
    pass


def progress_bar(total: int | None, *, initial: int = 0, desc: str = "", unit: str = "it", leave: bool = True,
                 stream: TextIO | None = None):
    """A progress bar for `total` units: tqdm on a terminal, else `LineProgress`. Both take update(n),
    set_postfix(**figures), write(text) (a message above the bar) and close()."""
    if style(stream=stream) == BAR:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=stream)
    return LineProgress(total, initial=initial, desc=desc, unit=unit, stream=stream)


class LineProgress:
    """Progress for a pipe or a file: a plain line every LINE_EVERY_FRACTION of `total` or LINE_EVERY_SECONDS,
    whichever comes first, and one at the end; never a carriage return."""

    def __init__(self, total: int | None, *, initial: int = 0, desc: str = "", unit: str = "it",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.initial, self.n, self.desc, self.unit = total, initial, initial, desc, unit
        self.stream, self.clock, self.postfix = stream, clock, ""
        self.started = self.last_time = clock()
        self.last_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        due = bool(self.total) and self.n - self.last_n >= LINE_EVERY_FRACTION * self.total
        if due or now - self.last_time >= LINE_EVERY_SECONDS:
            self._line(now)

    def set_postfix(self, **figures) -> None:
        self.postfix = ", ".join(f"{name}={value}" for name, value in sorted(figures.items()))

    @staticmethod
    def write(text: str) -> None:
        """A message between the progress lines (to stdout, as tqdm.write puts it)."""
        say(text)

    def close(self) -> None:
        if self.n != self.last_n:
            self._line(self.clock())

    def text(self, now: float) -> str:
        from tqdm import tqdm

        return tqdm.format_meter(self.n, self.total, now - self.started, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix, initial=self.initial,
                                 bar_format=LINE_FORMAT if self.total else OPEN_LINE_FORMAT)

    def _line(self, now: float) -> None:
        print(self.text(now), file=self.stream if self.stream is not None else sys.stderr, flush=True)
        self.last_n, self.last_time = self.n, now
