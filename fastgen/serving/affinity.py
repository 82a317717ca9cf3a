"""Prefix affinity for the router: requests that begin alike go where that beginning is cached.

Each replica's engine keeps a prefix cache of KV blocks, so a request whose prompt starts like an
earlier one's (a shared system prompt, the history of a conversation) is cheaper on the replica
that served the earlier one. `PrefixAffinity` remembers, for prompt prefixes of a few lengths
(32, 64, ... 4096 tokens), which replicas were sent a prompt that starts with them; the router
prefers those replicas while their load stays within a slack of the least loaded one, so one hot
prefix spreads over more replicas as its traffic grows instead of piling onto one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

PREFIX_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # multiples of every usual block size
MAX_OWNERS = 8  # replicas remembered per prefix


def prefix_keys(token_ids: Sequence[int]) -> list[int]:
    """Keys of the prompt's prefixes at `PREFIX_LENGTHS`, shortest first; only prefixes shorter
    than the prompt count (an engine always computes a prompt's last token)."""
    keys, key, start = [], 0, 0
    for length in PREFIX_LENGTHS:
        if length >= len(token_ids):
            break
        key = hash((key, tuple(token_ids[start:length])))
        keys.append(key)
        start = length
    return keys


class PrefixAffinity:
    """Which replicas were sent which prompt prefixes, least recently used forgotten first."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self._owners: OrderedDict[int, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def owners(self, keys: list[int], among: set[int] | None = None) -> list[int]:
        """The replicas (of ``among``, when given) that were sent the longest of these prefixes
        that any of them was sent."""
        for key in reversed(keys):
            owners = [r for r in self._owners.get(key, ()) if among is None or r in among]
            if owners:
                self._owners.move_to_end(key)
                return owners
        return []

    def record(self, keys: list[int], replica_id: int) -> None:
        """``replica_id`` was sent a prompt with these prefixes."""
        for key in keys:
            owners = self._owners.setdefault(key, [])
            if replica_id in owners:
                owners.remove(replica_id)
            owners.append(replica_id)  # the most recent last
            del owners[:-MAX_OWNERS]
            self._owners.move_to_end(key)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def discard(self, keys: list[int], replica_id: int) -> None:
        """``replica_id`` refused a prompt with these prefixes: it does not hold them after all."""
        for key in keys:
            owners = self._owners.get(key)
            if owners and replica_id in owners:
                owners.remove(replica_id)

    def forget(self, replica_id: int) -> None:
        """A replica died: its cache is gone."""
        for owners in self._owners.values():
            if replica_id in owners:
                owners.remove(replica_id)
