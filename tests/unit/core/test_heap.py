"""flowrl_async/heap.py: freezing long-lived objects and pausing the collector."""

import gc

import pytest

from flowrl_async.heap import Refreezer, freeze_survivors, gc_paused


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_freeze_survivors_moves_live_objects_out_of_the_collectors_sight():
    kept = [[i] for i in range(1000)]  # 1,001 tracked lists
    freeze_survivors()
    frozen = gc.get_freeze_count()
    assert frozen >= 1001
    assert all(gc.is_tracked(x) for x in kept)
    assert not any(x is kept for x in gc.get_objects())  # a full collection skips them
    del kept  # still freed by reference counting: nothing leaks
    assert gc.get_freeze_count() <= frozen - 1001


def test_refreezer_freezes_every_n_events():
    r = Refreezer(every=10)
    r.add(9)
    assert gc.get_freeze_count() == 0
    r.add(1)
    after_first = gc.get_freeze_count()
    assert after_first > 0 and r.count == 0
    gc.unfreeze()
    r.add(4)
    r.add(5)
    assert gc.get_freeze_count() == 0  # 9 since the last freeze
    r.add(3)  # 12: frozen, and the count starts again
    assert gc.get_freeze_count() > 0 and r.count == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_disables_inside_and_restores_what_was_there(enabled):
    (gc.enable if enabled else gc.disable)()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled() is enabled
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("x")
    assert gc.isenabled() is enabled
