"""What a long `pdmesh bench` run is doing, on stderr: rich progress bars on a terminal, one
line per phase otherwise (a log file, CI), so stdout keeps only the table or the JSON.

The benches live in layers that may not import one another (the engine's, the transport's,
the mesh's, the gateway's), so none imports this: each says what it is doing on the standard
`pdmesh.bench` logger, one record per phase (the message names it) and, within a phase, records
with `extra={"done": i, "total": n}`; `shown()` renders them while the `bench` group runs.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import IO, Iterator

LOGGER = "pdmesh.bench"


def _steps(record: logging.LogRecord) -> tuple[int, int] | None:
    total = getattr(record, "total", None)
    return (int(getattr(record, "done", 0)), int(total)) if total else None


class PhaseLines(logging.Handler):
    """`pdmesh bench NAME: [12.3 s] phase`, once per phase, and within a phase at each quarter of
    its steps: a log reader sees where the run is without one line per step."""

    def __init__(self, command: str, stream: IO[str], clock=time.monotonic):
        super().__init__()
        self.command, self.stream, self.clock = command, stream, clock
        self.start = clock()
        self.phase, self.quarter = "", 0

    def emit(self, record: logging.LogRecord) -> None:
        message, steps = record.getMessage(), _steps(record)
        if message != self.phase:
            self.phase, self.quarter = message, 0
            if steps is None or steps[0] == 0:
                self._line(message)
        if steps is not None:
            done, total = steps
            quarter = 4 * done // total
            if quarter > self.quarter:
                self.quarter = quarter
                self._line(f"{message}: {done}/{total}")

    def _line(self, text: str) -> None:
        self.stream.write(f"pdmesh bench {self.command}: [{self.clock() - self.start:.1f} s] {text}\n")
        self.stream.flush()


class Bars(logging.Handler):
    """One rich task per phase: a bar where the phase counts steps, a spinner where it does not;
    the previous phase is marked done when the next begins."""

    def __init__(self, progress):
        super().__init__()
        self.progress, self.task, self.phase = progress, None, ""

    def emit(self, record: logging.LogRecord) -> None:
        message, steps = record.getMessage(), _steps(record)
        if message != self.phase:
            self.finish()
            self.phase = message
            self.task = self.progress.add_task(message, total=steps[1] if steps else None)
        if steps is not None:
            self.progress.update(self.task, completed=steps[0], total=steps[1])

    def finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[self.task]
            self.progress.update(self.task, total=task.total or 1, completed=task.total or 1)


@contextlib.contextmanager
def shown(command: str, stream: IO[str] | None = None) -> Iterator[None]:
    """Renders the benches' phase records while the block runs (bars when `stream`, stderr by
    default, is a terminal)."""
    stream = stream or sys.stderr
    logger = logging.getLogger(LOGGER)
    level, propagate = logger.level, logger.propagate
    with contextlib.ExitStack() as stack:
        if stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            progress = stack.enter_context(Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                # transient: the bars go when the run ends, leaving the figures (printed above them) alone
                TimeElapsedColumn(), console=Console(file=stream), transient=True))
            handler: logging.Handler = Bars(progress)
        else:
            handler = PhaseLines(command, stream)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # phases are for the person watching, not for the logs of a serve
        try:
            yield
        finally:
            if isinstance(handler, Bars):
                handler.finish()
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
