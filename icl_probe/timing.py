"""A public timing seam: the engine's stages report their seconds to whoever listens (the benchmarks).

    with timings() as spent:
        analyze(model, tokenizer, context, query)
    spent  # {"capture": 0.012, "solve": 0.020, "ablation": 0.009, ...}

Outside `timings()` a `stage` costs one context-variable read. Stages may nest; each adds its own seconds.
"""

from __future__ import annotations

__all__ = ["timings", "stage"]

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SPENT: ContextVar[dict[str, float] | None] = ContextVar("icl_probe_timings", default=None)


@contextmanager
def timings() -> Iterator[dict[str, float]]:
    """Collect the seconds each engine stage spends inside the block: stage name → seconds (summed over calls)."""
    spent: dict[str, float] = {}
    token = _SPENT.set(spent)
    try:
        yield spent
    finally:
        _SPENT.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the block's wall-clock seconds to `name` in the innermost active `timings()`, if any."""
    spent = _SPENT.get()
    if spent is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
