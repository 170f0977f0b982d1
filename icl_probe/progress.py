"""Progress of long jobs, reported through a callback: the library counts, the caller draws (the CLI, a bar).

`progress(job, done, total)` is called with done = 0 when a job of `total` steps starts, then after each
step; `job` names what is counted ("queries", "generated tokens"). No terminal code lives here.

    def show(job, done, total):
        print(f"{job}: {done}/{total}")

    icl_probe.transfer(model, tokenizer, task, progress=show)
"""

from __future__ import annotations

__all__ = ["Progress", "Steps"]

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Progress = Callable[[str, int, int], None]
T = TypeVar("T")


class Steps:
    """One job of `total` steps, reported to `progress` (None: reported nowhere) as it starts and at each step;
    a job of no steps is not reported at all."""

    def __init__(self, progress: Progress | None, job: str, total: int):
        self.progress, self.job, self.total, self.done = progress, job, total, 0
        self.report()

    def report(self) -> None:
        if self.progress is not None and self.total > 0:
            self.progress(self.job, self.done, self.total)

    def step(self, n: int = 1) -> None:
        self.done += n
        self.report()

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """The items, one step counted as the caller finishes each (when it asks for the next)."""
        for item in items:
            yield item
            self.step()
