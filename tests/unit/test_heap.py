"""The collector's settings for a server process (recstream/heap.py)."""

from __future__ import annotations

import gc
import threading

from recstream.heap import SERVER_THRESHOLDS, tuned_collector


def _tracked(obj: object) -> bool:
    # gc.get_objects() lists what the collector scans; frozen objects are not in it
    return any(o is obj for o in gc.get_objects())


def test_inside_the_block_what_existed_is_frozen_and_full_collections_are_rarer() -> None:
    before = gc.get_threshold()
    # (an app another test left running in a thread of this process holds its own block
    # open: then the last exit, which unfreezes, is not this test's)
    alone = gc.get_freeze_count() == 0
    kept = [object()]  # a tracked container built before the block (as start-up's heap)
    assert _tracked(kept)
    with tuned_collector():
        assert gc.get_threshold() == SERVER_THRESHOLDS
        assert not _tracked(kept)
        made_inside = [object()]
        assert _tracked(made_inside)  # only what existed at the start is frozen
    assert gc.get_threshold() == before
    if alone:
        assert _tracked(kept)  # unfrozen: a later collection may free it again


def test_the_settings_come_back_when_the_last_of_several_blocks_exits() -> None:
    """Apps run in threads, started and stopped in any order (the tests' servers)."""
    before = gc.get_threshold()
    alone = gc.get_freeze_count() == 0  # (as in the test above)
    first_in = threading.Event()
    second_in = threading.Event()
    first_out = threading.Event()
    seen: list[tuple[int, int, int]] = []

    def first() -> None:
        with tuned_collector():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with tuned_collector():
        second_in.set()
        first_out.wait(5)
        # the first block exited while this one is open: the tuning stays
        seen.append(gc.get_threshold())
    thread.join(5)
    assert seen == [SERVER_THRESHOLDS]
    if alone:
        assert gc.get_threshold() == before
