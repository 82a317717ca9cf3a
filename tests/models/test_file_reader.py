"""fastgen.models.file_reader: a file read cold with O_DIRECT, warm from the page cache, half and
half, or through the page cache (O_DIRECT not asked for, refused at open or at the first read)
gives the same tensors as the safetensors package, into host memory and through staging buffers;
every piece is hashed, and a damaged piece is refused wherever it lies."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from fastgen.models import file_reader
from fastgen.models.file_reader import ALIGN_BYTES
from fastgen.models.safetensors_io import DamagedFileError, FileDigest, load_tensors, write_tensors

CHUNK = 16 * ALIGN_BYTES  # pieces on block boundaries: O_DIRECT reads them


def odd_tensors() -> dict[str, torch.Tensor]:
    """Sizes that are not multiples of a block, a zero-size tensor, several dtypes; with names
    that make the header (and so the data's start) land off any block boundary."""
    generator = torch.Generator().manual_seed(0)
    return {
        "a.big": torch.randn(50_001, generator=generator),
        "b.bf16": torch.randn(37, 1111, generator=generator).to(torch.bfloat16),
        "c.fp8": torch.randn(630, 17, generator=generator).to(torch.float8_e4m3fn),
        "d.ids": torch.arange(13),
        "e.empty": torch.empty(0, 7),
        "f.scalar": torch.tensor(3.5),
        "g.bytes": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=generator),
    }


@pytest.fixture
def written(tmp_path) -> tuple[Path, FileDigest, dict[str, torch.Tensor]]:
    tensors = odd_tensors()
    path = tmp_path / "odd.safetensors"
    digest = write_tensors(tensors, path, {"why": "odd offsets"}, chunk_bytes=CHUNK)
    data_start = path.stat().st_size - sum(t.numel() * t.element_size() for t in tensors.values())
    assert data_start % ALIGN_BYTES and digest.size % ALIGN_BYTES and len(digest.chunks) > 4
    return path, digest, tensors


def evict(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        resident = file_reader._resident_pages(descriptor, path.stat().st_size)
    finally:
        os.close(descriptor)
    if resident is None or any(resident):
        pytest.skip("cannot drop the file from the page cache here")


def warm(path: Path, end: int | None = None) -> None:
    """Bring the file (its first ``end`` bytes) into the page cache, without readahead beyond."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(descriptor, end or path.stat().st_size, 0)
    finally:
        os.close(descriptor)


def direct_allowed(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except (OSError, AttributeError):
        return False
    return True


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("staged", [False, True], ids=["host", "staged"])
def test_every_way_of_reading_gives_the_same_tensors(written, staged):
    path, digest, tensors = written
    cpu = torch.device("cpu")
    direct = direct_allowed(path)

    evict(path)
    cold = load_tensors(path, digest, cpu, staged=staged, workers=2)
    assert_same(cold.tensors, tensors)
    if direct:  # every piece from the disk, none through the page cache
        stats = cold.stats
        assert (stats.direct_bytes, stats.cached_bytes, stats.buffered_bytes) == (digest.size, 0, 0)

    warm(path)
    cached = load_tensors(path, digest, cpu, staged=staged, workers=2)
    assert_same(cached.tensors, tensors)
    assert cached.stats.cached_bytes == digest.size  # resident: mapped (host) or copied from the cache
    del cached  # its mapping would keep the pages in the cache

    evict(path)
    warm(path, 2 * CHUNK)  # the first two pieces resident, the rest not
    mixed = load_tensors(path, digest, cpu, staged=staged, workers=2)
    assert_same(mixed.tensors, tensors)
    assert mixed.stats.cached_bytes == 2 * CHUNK
    if direct:
        assert mixed.stats.direct_bytes == digest.size - 2 * CHUNK

    evict(path)
    plain = load_tensors(path, digest, cpu, staged=staged, direct=False, workers=1)
    assert_same(plain.tensors, tensors)
    assert plain.stats.buffered_bytes == digest.size
    assert plain.stats.direct_refused == "O_DIRECT not asked for"


def test_host_reads_land_in_the_tensors_own_memory(written):
    """On the CPU the tensors are views of the one page-aligned buffer the file was read into."""
    path, digest, _ = written
    evict(path)
    tensors = load_tensors(path, digest, torch.device("cpu")).tensors
    storages = {tensor.untyped_storage().data_ptr() for tensor in tensors.values()}
    assert len(storages) == 1 and storages.pop() % ALIGN_BYTES == 0


def test_pieces_off_block_boundaries_are_read_through_the_page_cache(tmp_path):
    tensors = odd_tensors()
    path = tmp_path / "unaligned.safetensors"
    digest = write_tensors(tensors, path, chunk_bytes=5000)
    evict(path)
    for staged in (False, True):
        loaded = load_tensors(path, digest, torch.device("cpu"), staged=staged)
        assert_same(loaded.tensors, tensors)
        assert loaded.stats.direct_bytes == 0 and "not block-aligned" in loaded.stats.direct_refused


def test_o_direct_refused_at_open_falls_back_to_the_page_cache(written, monkeypatch):
    """A file system without O_DIRECT (tmpfs before Linux 6.6) fails the open with EINVAL."""
    path, digest, tensors = written

    def refuse(path: Path, flag: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(file_reader, "_open_direct", refuse)
    for staged in (False, True):
        evict(path)
        loaded = load_tensors(path, digest, torch.device("cpu"), staged=staged)
        assert_same(loaded.tensors, tensors)
        assert (loaded.stats.direct_bytes, loaded.stats.buffered_bytes) == (0, digest.size)
        assert loaded.stats.direct_refused == "O_DIRECT refused: Invalid argument"


def test_o_direct_refused_at_read_falls_back_to_the_page_cache(written, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the reads (other alignment rules)."""
    path, digest, tensors = written
    opened: list[int] = []
    open_direct, preadv = file_reader._open_direct, os.preadv

    def record(path: Path, flag: int) -> int:
        opened.append(open_direct(path, flag))
        return opened[-1]

    def refuse_direct(descriptor: int, buffers, offset: int, *flags) -> int:
        if descriptor in opened:
            raise OSError(errno.EINVAL, "Invalid argument")
        return preadv(descriptor, buffers, offset, *flags)

    monkeypatch.setattr(file_reader, "_open_direct", record)
    monkeypatch.setattr(os, "preadv", refuse_direct)
    evict(path)
    loaded = load_tensors(path, digest, torch.device("cpu"))
    assert opened
    assert_same(loaded.tensors, tensors)
    assert (loaded.stats.direct_bytes, loaded.stats.buffered_bytes) == (0, digest.size)
    assert loaded.stats.direct_refused == "O_DIRECT reads refused: Invalid argument"


@pytest.mark.parametrize("staged", [False, True], ids=["host", "staged"])
def test_every_byte_is_hashed(written, monkeypatch, staged):
    """The check is not skipped: each piece is hashed once, and the pieces cover the file."""
    path, digest, _ = written
    hashed: list[int] = []
    sha = file_reader._sha

    def spy(data: memoryview) -> str:
        hashed.append(len(data))
        return sha(data)

    monkeypatch.setattr(file_reader, "_sha", spy)
    evict(path)
    load_tensors(path, digest, torch.device("cpu"), staged=staged)
    assert len(hashed) == len(digest.chunks) and sum(hashed) == digest.size


@pytest.mark.parametrize("piece", ["first", "middle", "last"])
@pytest.mark.parametrize("staged", [False, True], ids=["host", "staged"])
def test_a_damaged_piece_is_refused_wherever_it_lies(written, piece, staged):
    path, digest, _ = written
    data = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    index = {"first": 0, "middle": len(digest.chunks) // 2, "last": len(digest.chunks) - 1}[piece]
    position = max(index * CHUNK, data_start) + 3  # tensor data: the header still parses
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    evict(path)
    start, end = index * CHUNK, min((index + 1) * CHUNK, digest.size)
    message = rf"odd\.safetensors: bytes {start}\.\.{end} do not match the hash"
    with pytest.raises(DamagedFileError, match=message):
        load_tensors(path, digest, torch.device("cpu"), staged=staged)


@pytest.mark.gpu
@pytest.mark.parametrize("staged", [False, True], ids=["host", "staged"])
def test_gpu_reads_give_the_files_tensors_on_the_device(written, staged):
    """Onto a GPU, through host memory and one copy or through pinned staging buffers and a copy
    stream: cold (O_DIRECT where allowed), warm and plain reads give the file's tensors."""
    path, digest, tensors = written
    cuda = torch.device("cuda")
    evict(path)
    cold = load_tensors(path, digest, cuda, workers=2, staged=staged)
    assert all(tensor.device.type == "cuda" for tensor in cold.tensors.values())
    assert_same({name: tensor.cpu() for name, tensor in cold.tensors.items()}, tensors)
    if direct_allowed(path):
        assert cold.stats.direct_bytes == digest.size
    warm(path)
    cached = load_tensors(path, digest, cuda, workers=2, staged=staged)
    assert_same({name: tensor.cpu() for name, tensor in cached.tensors.items()}, tensors)
    evict(path)
    plain = load_tensors(path, digest, cuda, direct=False, workers=1, staged=staged)
    assert_same({name: tensor.cpu() for name, tensor in plain.tensors.items()}, tensors)
