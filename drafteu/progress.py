"""Progress for long work: a rich bar on a terminal, periodic plain lines in logs and CI."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def _duration(seconds: float) -> str:
    """``42s``, ``17m``, ``3h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Lines:
    """Non-terminal fallback: one line every ``every`` seconds and at the end, with the time this
    sitting has run and, once it has made progress, the time left at its rate (a resumed job's earlier
    work does not count towards the rate)."""

    def __init__(self, desc: str, total: int, completed: int, every: float = 30.0):
        self.desc, self.total, self.done, self.info = desc, total, completed, ""
        self.every, self.last = every, time.time()
        self.start, self.t0 = completed, self.last

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.time()) - self.t0
        made, left = self.done - self.start, self.total - self.done
        eta = f", ~{_duration(elapsed * left / made)} left" if made > 0 and left > 0 else ""
        info = f" {self.info}" if self.info else ""
        return f"{self.desc}: {self.done}/{self.total}{info} ({_duration(elapsed)}{eta})"

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        self.done = completed if completed is not None else self.done + advance
        self.info = info if info is not None else self.info
        if time.time() - self.last >= self.every:
            self.emit()

    def emit(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self.last = time.time()


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        kw = {"info": info} if info is not None else {}
        if completed is not None:
            self.progress.update(self.task, completed=completed, **kw)
        else:
            self.progress.update(self.task, advance=advance, **kw)


@contextmanager
def progress(desc: str, total: int, completed: int = 0, enabled: bool = True):
    """``with progress("train", total) as p: p.update(advance=1, info="loss 0.1")``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not enabled:
        yield _Lines(desc, total, completed, every=float("inf"))
        return
    if not console.is_terminal:
        lines = _Lines(desc, total, completed)
        yield lines
        lines.emit()
        return
    columns = [TextColumn(desc), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        yield _Bar(bar, bar.add_task(desc, total=total, completed=completed, info=""))


def note(message: str) -> None:
    """A one-line notice on stderr (resolved settings, skipped work), from the main process only."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
