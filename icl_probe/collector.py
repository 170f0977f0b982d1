"""Python's cyclic garbage collector kept off the objects a run finds in place (the loaded model's, mostly).

A loaded SmolLM2 with its tokenizer leaves about 370,000 objects that the collector tracks. A batch allocates
enough small objects (tensors, records, result dicts) to set off a full collection now and then, and each one
walks all of them: about 200 ms, once every other 64-prompt batch run here, where the batch took 3.6-4.0 s.
`gc.freeze` moves the objects that exist to a generation no collection walks, in constant time; the run's
own objects are still collected as usual, and `gc.unfreeze` hands the frozen ones back at the end.

    with frozen_objects():
        run_batch(...)
"""

from __future__ import annotations

__all__ = ["frozen_objects"]

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_open = 0  # how many frozen_objects blocks are open: inside one, the objects are frozen already


@contextmanager
def frozen_objects() -> Iterator[None]:
    """Inside the block, the collector leaves alone the objects that exist on entry; afterwards they are collected
    as before. Nothing is done when the collector is off or something (a caller, an outer block) froze objects
    already: their freeze is left as it is.

    An outer block is known from a counter, not from `gc.get_freeze_count`, which counts the frozen objects one by
    one: with SmolLM2 loaded, 28 ms a call, which `run_batch` paid once a batch, and one at a time once a prompt."""
    global _open
    if _open or not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    _open += 1
    try:
        yield
    finally:
        _open -= 1
        gc.unfreeze()
