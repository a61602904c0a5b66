"""Progress display on stderr. Off by default (library use); the CLI turns it on unless --json/--quiet."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
_state = {"enabled": False}
stderr = Console(stderr=True)


def enable(on: bool = True) -> None:
    _state["enabled"] = on


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar when progress display is on."""
    if not _state["enabled"]:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)


@contextlib.contextmanager
def phase(description: str):
    """A spinner with a label while one step runs."""
    if not _state["enabled"]:
        yield
        return
    with stderr.status(description):
        yield


def stdout_console(quiet: bool = False) -> Console:
    """Console for tables: terminal width on a terminal, 140 columns when piped (logs, CI)."""
    console = Console(quiet=quiet)
    if not console.is_terminal:
        console = Console(quiet=quiet, width=140)
    return console
