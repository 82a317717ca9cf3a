import pytest

from fastgen.block_manager import BlockManager


def test_allocate_and_free_round_trip():
    manager = BlockManager(num_blocks=8, block_size=16)
    first = manager.allocate(3)
    second = manager.allocate(5)
    assert len(set(first) | set(second)) == 8
    assert manager.num_free == 0
    assert not manager.can_allocate(1)
    with pytest.raises(MemoryError):
        manager.allocate(1)
    manager.free(first)
    assert manager.num_free == 3
    again = manager.allocate(3)
    assert sorted(again) == sorted(first)
    manager.free(second)
    manager.free(again)
    assert manager.num_free == 8 and manager.num_used == 0


def test_blocks_for_rounds_up():
    manager = BlockManager(num_blocks=4, block_size=16)
    assert [manager.blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=0, block_size=16)
