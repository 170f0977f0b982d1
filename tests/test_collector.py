"""collector.frozen_objects: what exists on entry is out of the cyclic collector's reach until the block ends."""

import gc
import weakref

from icl_probe.collector import frozen_objects


class Node:
    pass


def cycle() -> tuple[Node, weakref.ref]:
    node = Node()
    node.me = node  # only the cyclic collector frees it
    return node, weakref.ref(node)


def test_objects_from_before_wait_for_the_end_and_the_blocks_own_are_collected():
    assert gc.get_freeze_count() == 0
    old, old_ref = cycle()
    with frozen_objects():
        assert gc.get_freeze_count() > 0
        del old  # garbage now, but frozen: no collection inside the block may free it
        new, new_ref = cycle()
        del new
        gc.collect()
        assert new_ref() is None  # made inside the block: collected as usual
        assert old_ref() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # handed back, and freed by the next collection


def test_a_freeze_made_before_is_left_as_it_was():
    old, old_ref = cycle()
    gc.freeze()  # the caller's own freeze
    try:
        with frozen_objects(), frozen_objects():  # an outer freeze (the caller's or another block's): nothing done
            pass
        del old
        gc.collect()
        assert old_ref() is not None  # still frozen: the blocks did not unfreeze the caller's objects
    finally:
        gc.unfreeze()
    gc.collect()
    assert old_ref() is None
