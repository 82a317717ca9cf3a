"""Keeping Python's cyclic garbage collector off the serving path.

A full collection scans every container object the process holds: after start-up that is the
model's modules, torch's, Triton's and the tokenizer's objects (a few hundred thousand), and the
scan holds the GIL for tens of milliseconds, a stall for every running request. `gc.freeze` moves
the objects alive at that moment into a generation the collector never scans; what serving
allocates later is still collected as usual.

Freezing is process-wide, so an engine in a host application holds the freeze while it runs and
the last engine to stop lifts it: objects frozen meanwhile (the host's included) are then
collectable again, and a stopped engine's cycles are found by the next collection.
"""

from __future__ import annotations

import gc

_holders = 0


def hold_frozen_heap() -> int:
    """Collect, then freeze every object alive; returns how many objects are frozen."""
    global _holders
    _holders += 1
    return _collect_and_freeze()


def release_frozen_heap() -> None:
    """Give back one `hold_frozen_heap`; the last one unfreezes the heap."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0:
        gc.unfreeze()


def freeze_process_heap() -> int:
    """Collect and freeze for the rest of the process (a worker process, which serves until it
    exits); returns how many objects are frozen."""
    return _collect_and_freeze()


def _collect_and_freeze() -> int:
    gc.collect()  # garbage frozen now would be kept until the freeze is lifted
    gc.freeze()
    return gc.get_freeze_count()
