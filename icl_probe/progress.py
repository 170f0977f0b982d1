"""Progress of long jobs, reported through a callback: the library counts, the caller draws (the CLI, a bar).

`progress(job, done, total)` is called with done = 0 when a job of `total` steps starts, then after each
step; `job` names what is counted ("queries", "generated tokens"). No terminal code lives here.

    def show(job, done, total):
        print(f"{job}: {done}/{total}")

    icl_probe.transfer(model, tokenizer, task, progress=show)
"""

from __future__ import annotations

__all__ = ["Progress", "Steps", "Clock", "clock_text"]

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


class Clock:
    """Progress lines with an ETA, for jobs of many items (a study's cells, the coverage table's types): the mean time
    of the items run so far in this process times the items left."""

    def __init__(self, total: int, already: int):
        self.total, self.count, self.ran, self.spent = total, already, 0, 0.0

    def tick(self, cid: str, seconds: float, failed: bool) -> str:
        self.count += 1
        self.ran += 1
        self.spent += seconds
        eta = self.spent / self.ran * (self.total - self.count)
        state = "failed" if failed else f"{seconds:.1f} s"
        return f"[{self.count}/{self.total}] {cid}: {state}; ETA {clock_text(eta)}"


def clock_text(seconds: float) -> str:
    """A duration as an ETA reads it: 4m05s, or 1h02m from an hour on."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
