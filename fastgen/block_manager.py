"""The paged KV cache's bookkeeping: which blocks are free, and which hold a reusable prefix.

Pure Python, O(1) per block. With prefix caching, a full block whose keys and values are computed
is registered under a `BlockKey`: a BLAKE2 digest of the key before it, and the block's own
tokens, so a key names the whole prefix up to the block's end (a digest, not Python's ``hash``,
so that nobody can craft a prompt whose blocks pass for another prompt's). A later sequence whose
prompt starts with the same prefix takes those blocks instead of computing them; blocks are
reference counted. A registered block that no sequence uses stays cached until its space is
needed: allocation takes never-used blocks first, then evicts cached ones, least recently freed
first, and the end of a freed prefix before its beginning (a lookup stops at the first missing
block, so a prefix's start is worth the most).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockKey = tuple[bytes, tuple[int, ...]]  # (digest of the previous block's key, this block's token ids)


def block_keys(
    token_ids: Sequence[int], block_size: int, count: int, known: list[BlockKey]
) -> list[BlockKey]:
    """The keys of the first ``count`` full blocks of ``token_ids``; ``known`` holds the first
    keys already computed and is extended in place."""
    for index in range(len(known), count):
        parent = _digest(known[-1]) if known else b""
        known.append((parent, tuple(token_ids[index * block_size : (index + 1) * block_size])))
    return known[:count]


def _digest(key: BlockKey) -> bytes:
    parent, tokens = key
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """A free list of KV-cache blocks, with reference counts and, when enabled, a prefix cache.

    Blocks are numbered ``0 .. num_blocks - 1``; the sequences own their block tables
    (`fastgen.sequence.Sequence.block_table`).
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # popped from the end: low block ids are handed out first, which keeps tests readable
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._block_of: dict[BlockKey, int] = {}  # registered blocks, used or cached
        self._key_of: dict[int, BlockKey] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and unused, oldest first

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used, or cached and unused."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks, in use or not."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks; raises `MemoryError` when fewer are free."""
        if count > self.num_free:
            raise MemoryError(f"asked for {count} KV blocks, {self.num_free} free")
        fresh = min(count, len(self._free))
        taken = self._free[len(self._free) - fresh :]
        del self._free[len(self._free) - fresh :]
        taken.reverse()
        for _ in range(count - fresh):
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; unused registered blocks stay cached."""
        released = []
        for block in reversed(blocks):  # a prefix's end becomes evictable first
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    released.append(block)
        self._free.extend(released)

    def lookup(self, keys: list[BlockKey]) -> list[int]:
        """The cached blocks of the longest prefix of ``keys``, each with a reference taken."""
        if not self.prefix_caching:
            return []
        hits = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            hits.append(block)
        return hits

    def register(self, block: int, key: BlockKey) -> None:
        """Record that ``block`` holds the computed prefix ``key`` (the first block to hold a prefix
        keeps it; a duplicate computed meanwhile is not registered)."""
        if self.prefix_caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
