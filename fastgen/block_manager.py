"""The paged KV cache's bookkeeping: which blocks are free. Pure Python, O(1) per block."""

from __future__ import annotations


class BlockManager:
    """A free list of KV-cache blocks.

    Blocks are numbered ``0 .. num_blocks - 1``. `allocate` and `free` are O(1) per block; the
    sequences own their block tables (`fastgen.sequence.Sequence.block_table`).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # popped from the end: low block ids are handed out first, which keeps tests readable
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks; raises `MemoryError` when fewer are free."""
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        if count == 0:
            return []
        taken = self._free[-count:]
        del self._free[-count:]
        taken.reverse()
        return taken

    def free(self, blocks: list[int]) -> None:
        """Return ``blocks`` to the free list."""
        self._free.extend(reversed(blocks))
