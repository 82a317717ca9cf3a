"""Reading a file onto a device at the disk's speed, every piece checked against its hash.

A cold read through the page cache (page faults on a mapping, or ``read`` with the kernel's
readahead) gets a fraction of what the disk gives, and copies everything once more through the
cache. `read_verified` reads each ``chunk_bytes`` piece of the file (the pieces its `FileDigest`
hashes) with ``O_DIRECT`` straight into memory the data stays in. For the CPU that is one
page-aligned host buffer the tensors are views of. For a GPU (``staged``, its default) pieces
land in pinned staging buffers, each copied to the device while the next pieces are read: no
host memory the size of the file, and no whole-file copy after the last read. A piece already in
the page cache (``mincore`` says so) is copied from there instead, which is faster than the disk;
a file wholly in the cache is mapped, not copied, when read to host memory. Where the file system
refuses ``O_DIRECT``, or the pieces are not aligned to its blocks, pieces are read through the
page cache.

Reading and hashing are separate stages: a few I/O threads keep reads in flight, in file order,
and hand each piece to a pool of hashing threads (SHA-256 is CPU-bound, about 1 GB/s a core), so
the disk never waits for a hash and the check adds only the last piece's hash to the read. Every
piece is verified before `read_verified` returns; the first that differs raises `DamagedFileError`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .safetensors_io import HASH_NAME, DamagedFileError, FileDigest

if TYPE_CHECKING:  # imported where tensors are made
    import torch

# O_DIRECT wants file offsets, lengths and memory addresses aligned to the device's logical block
# size: 512 or 4096 bytes on today's disks, so 4096 satisfies both
ALIGN_BYTES = 4096
# reads in flight: one O_DIRECT read of a piece is already split into many device requests; a few
# more keep the queue full while a thread is between reads
IO_THREADS = 4


@dataclass
class ReadStats:
    """How the bytes of a file came in."""

    direct_bytes: int = 0  # from the disk with O_DIRECT
    cached_bytes: int = 0  # copied from the page cache, where the piece was resident
    buffered_bytes: int = 0  # through the page cache though not resident (O_DIRECT not used)
    direct_refused: str = ""  # why O_DIRECT was not used, where it was not

    def describe(self) -> str:
        gb = 1e9
        parts = [f"{self.direct_bytes / gb:.3f} GB O_DIRECT", f"{self.cached_bytes / gb:.3f} GB page cache"]
        if self.buffered_bytes or self.direct_refused:
            parts.append(f"{self.buffered_bytes / gb:.3f} GB buffered ({self.direct_refused or 'resident'})")
        return ", ".join(parts)


def read_verified(
    path: Path,
    expected: FileDigest,
    device: torch.device,
    *,
    data_start: int,
    hash_threads: int | None = None,
    io_threads: int | None = None,
    direct: bool = True,
    staged: bool | None = None,
) -> tuple[torch.Tensor, ReadStats]:
    """Bytes ``data_start`` to the end of the file at ``path`` as one uint8 tensor on ``device``,
    once every piece of the file matches ``expected`` (`DamagedFileError` otherwise).

    ``direct=False`` reads through the page cache only. ``staged`` (default: on a GPU) reads
    through staging buffers and copies them to ``device``; otherwise the file is read into host
    memory (the returned tensor's own on the CPU), then copied to ``device`` whole. ``io_threads``
    reads (default `IO_THREADS`) are kept in flight."""
    size = expected.size
    chunk = expected.chunk_bytes
    pieces = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
    if len(pieces) != len(expected.chunks):
        raise DamagedFileError(f"{path}: {len(pieces)} pieces where {len(expected.chunks)} were hashed")
    staged = device.type == "cuda" if staged is None else staged
    io_threads = io_threads or IO_THREADS
    hash_threads = hash_threads or max(1, min(16, len(os.sched_getaffinity(0))))
    refused = "" if direct else "O_DIRECT not asked for"
    if direct and chunk % ALIGN_BYTES:  # a piece's aligned reads would overlap its neighbours'
        refused = f"pieces of {chunk} bytes are not block-aligned"
    source = _Source(path, refused=refused)
    try:
        resident = _resident_pages(source.buffered, size)
        sink: _Sink
        if staged:
            # staging buffers to cycle through: one for each read in flight, as many for the pieces
            # being hashed and copied meanwhile
            buffers = min(len(pieces), 2 * io_threads)
            sink = _StagedSink(device, size - data_start, data_start, _round_up(chunk), buffers)
        elif _is_resident(resident, 0, size):
            sink = _MappedSink(source.buffered, size, data_start)  # no copy of what the cache holds
        else:
            sink = _HostSink(size, data_start)
        stats = _run_pipeline(path, expected, pieces, source, sink, resident, hash_threads, io_threads)
        stats.direct_refused = source.refused
        data = sink.result()
        return (data if staged or device.type == "cpu" else data.to(device)), stats
    finally:
        source.close()


def _round_up(count: int) -> int:
    return -(-count // ALIGN_BYTES) * ALIGN_BYTES


# -- the file ----------------------------------------------------------------------------------------


class _Source:
    """The file open for reads through the page cache and, where the file system allows, for
    ``O_DIRECT`` ones (``refused`` says why not)."""

    def __init__(self, path: Path, *, refused: str = ""):
        self.path = path
        self.buffered = os.open(path, os.O_RDONLY)
        self.direct: int | None = None  # None once O_DIRECT is refused
        self._direct_descriptor: int | None = None
        self.refused = refused
        flag = getattr(os, "O_DIRECT", None)
        if not refused and flag is None:
            self.refused = "O_DIRECT unavailable on this platform"
        elif not refused:
            try:
                self.direct = self._direct_descriptor = _open_direct(path, flag)
            except OSError as exc:  # EINVAL: a file system without O_DIRECT (tmpfs before Linux 6.6)
                self.refused = f"O_DIRECT refused: {exc.strerror}"
        if self.direct is None:
            # the kernel's readahead doubles its window for a file read in order
            os.posix_fadvise(self.buffered, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(self, target: memoryview, offset: int, needed: int, direct: bool) -> bool:
        """Fill ``target`` (as much as the file holds, at least ``needed`` bytes) from ``offset``;
        with ``direct``, ``target`` and ``offset`` are block-aligned and ``len(target)`` a
        multiple of the block. Whether O_DIRECT read it (it falls back when refused here)."""
        filled = 0
        while filled < needed:
            descriptor = self.direct if direct else self.buffered
            if descriptor is None:
                direct, descriptor = False, self.buffered
            try:
                count = os.preadv(descriptor, [target[filled:]], offset + filled)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                # a file system that opens with O_DIRECT but wants other alignment: stop using it
                self.refused = f"O_DIRECT reads refused: {exc.strerror}"
                self.direct = None
                direct = False
                continue
            if not count:
                raise DamagedFileError(f"{self.path}: ended after {offset + filled} bytes")
            filled += count
            if direct and filled % ALIGN_BYTES and filled < needed:
                direct = False  # a short read mid-file leaves an unaligned offset
        return direct

    def close(self) -> None:
        os.close(self.buffered)
        if self._direct_descriptor is not None:
            os.close(self._direct_descriptor)
        self.direct = self._direct_descriptor = None


def _open_direct(path: Path, flag: int) -> int:
    """A descriptor reading ``path`` with O_DIRECT (tests replace this to refuse it)."""
    return os.open(path, os.O_RDONLY | flag)


_LIBC: Any = None


def drop_from_page_cache(path: Path) -> None:
    """Write ``path``'s dirty pages, then drop its pages from the page cache, so that the next read
    comes from the disk (only clean pages can be dropped)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def _resident_pages(descriptor: int, size: int) -> bytes | None:
    """One byte per page of the file, nonzero where the page is in the page cache (``mincore``
    on a mapping that is never touched: nothing is read); None where it cannot be asked."""
    global _LIBC
    try:
        if _LIBC is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]  # fmt: skip
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _LIBC = libc
    except (OSError, AttributeError):
        return None
    address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vector = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        if _LIBC.mincore(address, size, vector):
            return None
        return bytes(vector)
    finally:
        _LIBC.munmap(address, size)


def _is_resident(resident: bytes | None, start: int, end: int) -> bool:
    if resident is None:
        return False
    return resident[start // mmap.PAGESIZE : -(-end // mmap.PAGESIZE)].count(0) == 0


# -- where the bytes go ------------------------------------------------------------------------------


@dataclass
class _Slot:
    """Memory one piece is read into: ``target`` starts at the piece's first byte."""

    target: memoryview
    buffer: Any = None  # the staging buffer (a staged read), returned to the pool after the hash
    copied: Any = None  # the CUDA event of the piece's copy to the device


class _Sink:
    reads = True  # whether pieces are read into the slots (a mapped file's are there already)

    def take(self, start: int, end: int) -> _Slot:
        raise NotImplementedError

    def landed(self, slot: _Slot, start: int, end: int) -> None:
        """The piece is in ``slot``: send it on (a staged read copies it to the device)."""

    def release(self, slot: _Slot) -> None:
        """The piece is hashed: ``slot``'s memory may be reused once its copy is done."""

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class _HostSink(_Sink):
    """The whole file read into one page-aligned host buffer (private anonymous memory), which
    the tensors are views of; a piece's aligned reads land at its own offsets."""

    def __init__(self, size: int, data_start: int):
        import torch

        self.size, self.data_start = size, data_start
        length = max(_round_up(size), ALIGN_BYTES)
        # (no MADV_HUGEPAGE: where the kernel compacts memory for it, faults stall for seconds)
        self.memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.memory)
        self.whole = torch.frombuffer(self.memory, dtype=torch.uint8)  # keeps the mapping alive

    def take(self, start: int, end: int) -> _Slot:
        return _Slot(self.view[start : _round_up(end)])

    def result(self) -> torch.Tensor:
        return self.whole[self.data_start : self.size]


class _MappedSink(_Sink):
    """A file wholly in the page cache, mapped privately: the tensors are views of the cache's
    pages (a write would copy a page; none happens), so nothing is read or copied, only hashed.
    (Pages the kernel drops are read again from the same file later: fastgen never rewrites a
    snapshot's files in place, a new snapshot is a new directory renamed into place.)"""

    reads = False

    def __init__(self, descriptor: int, size: int, data_start: int):
        import torch

        protection = mmap.PROT_READ | mmap.PROT_WRITE  # torch wants writable buffers
        self.memory = mmap.mmap(descriptor, size, flags=mmap.MAP_PRIVATE, prot=protection)
        self.view = memoryview(self.memory)
        self.data = torch.frombuffer(self.memory, dtype=torch.uint8)[data_start:]

    def take(self, start: int, end: int) -> _Slot:
        return _Slot(self.view[start:end])

    def result(self) -> torch.Tensor:
        return self.data


class _StagedSink(_Sink):
    """Pieces read into staging buffers (pinned on a GPU) and copied, asynchronously on a stream
    of their own, into one tensor on the device holding the file from ``data_start``."""

    def __init__(self, device: torch.device, length: int, data_start: int, buffer_bytes: int, count: int):
        import torch

        self.data_start = data_start
        self.cuda = device.type == "cuda"
        self.data = torch.empty(length, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the allocation is ready
        # buffers are made as the readers first need them: pinning memory takes time that the
        # first reads then overlap
        self.buffer_bytes, self.unmade = buffer_bytes, max(1, count)
        self.lock = threading.Lock()
        self.free: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def take(self, start: int, end: int) -> _Slot:
        try:
            buffer = self.free.get_nowait()
        except queue.Empty:
            with self.lock:
                make, self.unmade = self.unmade > 0, max(0, self.unmade - 1)
            buffer = _aligned_buffer(self.buffer_bytes, pinned=self.cuda) if make else self.free.get()
        return _Slot(memoryview(buffer.numpy())[: _round_up(end - start)], buffer=buffer)

    def landed(self, slot: _Slot, start: int, end: int) -> None:
        import torch

        low = max(start, self.data_start)
        if end <= low:
            return  # the header alone
        part = slot.buffer[low - start : end - start]
        destination = self.data[low - self.data_start : end - self.data_start]
        if self.stream is None:
            destination.copy_(part)
            return
        with torch.cuda.stream(self.stream):
            destination.copy_(part, non_blocking=True)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self.stream)

    def release(self, slot: _Slot) -> None:
        if slot.copied is not None:
            slot.copied.synchronize()
        self.free.put(slot.buffer)

    def result(self) -> torch.Tensor:
        if self.stream is not None:
            self.stream.synchronize()
        return self.data


def _aligned_buffer(count: int, *, pinned: bool) -> torch.Tensor:
    """``count`` bytes of host memory starting on a block boundary; pinned for a GPU's copies
    (its allocator rounds to powers of two: ``count`` should be one, as pieces are)."""
    import torch

    if not pinned:
        memory = mmap.mmap(-1, count, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(memory, dtype=torch.uint8)
    buffer = torch.empty(count, dtype=torch.uint8, pin_memory=True)
    if buffer.data_ptr() % ALIGN_BYTES:
        buffer = torch.empty(count + ALIGN_BYTES, dtype=torch.uint8, pin_memory=True)
        skip = -buffer.data_ptr() % ALIGN_BYTES
        buffer = buffer[skip : skip + count]
    return buffer


# -- the pipeline ------------------------------------------------------------------------------------


def _run_pipeline(
    path: Path,
    expected: FileDigest,
    pieces: list[tuple[int, int]],
    source: _Source,
    sink: _Sink,
    resident: bytes | None,
    hash_threads: int,
    io_threads: int,
) -> ReadStats:
    """Read ``pieces`` in file order on ``io_threads`` threads into ``sink``, hashing each on
    ``hash_threads`` others; raise for the first piece (in file order) that does not match."""
    failed = threading.Event()

    def hash_piece(slot: _Slot, length: int) -> str:
        try:
            return "" if failed.is_set() else _sha(slot.target[:length])
        finally:
            sink.release(slot)

    def read_piece(start: int, end: int) -> tuple[str, Future[str]] | None:
        if failed.is_set():
            return None
        slot = sink.take(start, end)
        try:
            if failed.is_set():
                sink.release(slot)
                return None
            cached = not sink.reads or _is_resident(resident, start, end)
            wants_direct = source.direct is not None and not cached
            target = slot.target if wants_direct else slot.target[: end - start]
            direct = sink.reads and source.read(target, start, end - start, wants_direct)
            sink.landed(slot, start, end)
        except BaseException:
            sink.release(slot)
            raise
        how = "direct" if direct else ("cached" if cached else "buffered")
        return how, hash_pool.submit(hash_piece, slot, end - start)

    stats = ReadStats()
    # the hashing pool outlives the readers, which hand it work (exits run in reverse order)
    with (
        ThreadPoolExecutor(hash_threads, thread_name_prefix="fastgen-hash") as hash_pool,
        ThreadPoolExecutor(min(io_threads, len(pieces)), thread_name_prefix="fastgen-read") as io_pool,
    ):
        reads = [io_pool.submit(read_piece, start, end) for start, end in pieces]
        try:
            for (start, end), read, digest in zip(pieces, reads, expected.chunks):
                done = read.result()
                assert done is not None  # only None once a failure was flagged
                how, hashed = done
                setattr(stats, f"{how}_bytes", getattr(stats, f"{how}_bytes") + end - start)
                if hashed.result() != digest:
                    raise DamagedFileError(
                        f"{path}: bytes {start}..{end} do not match the hash written with the file "
                        "(damaged or changed since)"
                    )
        except BaseException:
            failed.set()  # readers and hashers still queued return at once, freeing their buffers
            for read in reads:
                read.cancel()
            raise
    return stats


def _sha(data: memoryview) -> str:
    return hashlib.new(HASH_NAME, data).hexdigest()

