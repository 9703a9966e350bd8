"""The process a server runs in (stream/server.py)."""

from __future__ import annotations

import gc

from stream.server import FULL_COLLECTION_EVERY, settle_heap


def test_settle_heap_freezes_what_start_up_built_and_makes_full_collections_rarer():
    """After start-up, existing objects are left out of collections and full ones run a tenth as often."""
    before = gc.get_threshold()
    built = [[index] for index in range(10)]
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        collected = {id(tracked) for tracked in gc.get_objects()}
        assert gc.is_tracked(built) and id(built) not in collected
        assert gc.get_threshold() == (before[0], before[1], FULL_COLLECTION_EVERY) and FULL_COLLECTION_EVERY > before[2]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
