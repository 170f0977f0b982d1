"""What a long command is doing, on stderr: a spinner line, and under it a bar per job the library counts.

The library reports `progress(job, done, total)` (icl_probe/progress.py); here each job becomes a rich bar
with its count and an ETA. With `--json -` (counted=False) only the spinner line is drawn, and on a
stderr that is not a terminal nothing at all. The display is transient: the results replace it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.spinner import Spinner

SPEED_WINDOW = 24 * 3600.0  # seconds


class Work(Progress):
    """A spinner with a message above the bars; call it as the library's progress callback."""

    def __init__(self, console: Console, message: str, counted: bool):
        self.status = Spinner("dots", text=message)  # set first: rich draws while it initialises
        self.counted = counted
        self.jobs: dict[str, int] = {}
        columns = (TextColumn("  {task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                   TextColumn("eta"), TimeRemainingColumn())  # fmt: skip
        # off the terminal rich would still end with a blank line: draw nothing there
        # the ETA from the average speed since the start: a step of a real model can take minutes, longer
        # than rich's default 30-second window, which would leave the ETA blank
        super().__init__(*columns, console=console, transient=True, disable=not console.is_terminal,
                         speed_estimate_period=SPEED_WINDOW)  # fmt: skip

    def say(self, message: str) -> None:
        """Change the spinner's message."""
        self.status.update(text=message)

    def __call__(self, job: str, done: int, total: int) -> None:
        if not self.counted:
            return
        if job not in self.jobs:
            self.jobs[job] = self.add_task(job, total=total)
        self.update(self.jobs[job], completed=done, total=total)

    def get_renderables(self):
        yield self.status
        if self.tasks:
            yield self.make_tasks_table(self.tasks)


@contextmanager
def working(console: Console, message: str, counted: bool = True) -> Iterator[Work]:
    """The spinner with `message` and, if `counted`, the bars of the jobs reported to the yielded callback."""
    with Work(console, message, counted) as work:
        yield work
