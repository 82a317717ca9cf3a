"""The garbage collector's freeze around a running engine (`fastgen.heap`)."""

from __future__ import annotations

import gc
import weakref

import pytest

from fastgen import heap


class Node:
    """A container that can be part of a reference cycle and be watched by a weak reference."""

    def __init__(self) -> None:
        self.other: Node | None = None


def make_cycle() -> Node:
    first, second = Node(), Node()
    first.other, second.other = second, first
    return first


@pytest.fixture(autouse=True)
def thawed_heap():
    """Each test starts and ends with nothing frozen and no holder left behind."""
    gc.unfreeze()
    yield
    while heap._holders:
        heap.release_frozen_heap()
    gc.unfreeze()


def test_a_held_heap_keeps_earlier_cycles_out_of_collections_until_released():
    older = weakref.ref(make_cycle())
    gc.collect()
    assert older() is None  # collectable before any freeze

    alive = make_cycle()  # in use when the engine starts, garbage while it runs
    kept = weakref.ref(alive)
    frozen = heap.hold_frozen_heap()
    assert frozen == gc.get_freeze_count() > 0
    del alive
    gc.collect()
    assert kept() is not None, "a cycle alive at the freeze must not be scanned while held"
    newer = weakref.ref(make_cycle())
    gc.collect()
    assert newer() is None, "objects allocated after the freeze are collected as usual"
    heap.release_frozen_heap()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert kept() is None, "after the release the stopped engine's cycles are collectable again"


def test_the_last_holder_lifts_the_freeze():
    heap.hold_frozen_heap()
    heap.hold_frozen_heap()
    heap.release_frozen_heap()
    assert gc.get_freeze_count() > 0, "another engine still runs"
    heap.release_frozen_heap()
    assert gc.get_freeze_count() == 0
    heap.release_frozen_heap()  # one release too many changes nothing
    assert heap._holders == 0 and gc.get_freeze_count() == 0

