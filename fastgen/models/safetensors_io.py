"""Safetensors files written and read with a content hash, read straight onto a device.

The hash of a file is a list: the SHA-256 of each ``chunk_bytes`` piece of it (`FileDigest`), so
that reading can verify every piece as it arrives, on several cores at once, and name the bytes
that differ. (SHA-256 rather than BLAKE2b: CPUs with SHA extensions, today's x86 and Arm servers,
hash it about twice as fast — 1.1 vs 0.5 GB/s a core on the development box.)

`load_tensors` (and `read_tensors`) parse a file's header, then read its data once, in pieces,
into one buffer on the target device, every piece hashed as it arrives
(`fastgen.models.file_reader`: O_DIRECT into the final memory, hashing on other threads than
reading). Every tensor is a view of that buffer, so nothing is copied or converted after the
read; a piece that does not match its hash raises `DamagedFileError` before any tensor is returned.

`write_tensors` writes a file readers of the safetensors format accept (``safetensors.safe_open``
reads it), tensors ordered by element size so that each starts aligned to its own size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from fastgen.errors import ModelLoadError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: checks stay torch-free
    import torch

    from .file_reader import ReadStats

CHUNK_BYTES = 32 << 20
HASH_NAME = "sha256"

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _dtypes() -> dict[str, torch.dtype]:
    """Safetensors dtype names -> torch dtypes."""
    import torch

    return {name: getattr(torch, attribute) for name, attribute in _DTYPE_NAMES.items()}


class DamagedFileError(ModelLoadError):
    """A file does not match its recorded size or hash (truncated, overwritten, bit rot)."""


class FileDigest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A file's size and the hash of each ``chunk_bytes`` piece of it, in order."""

    name: str  # relative to the directory that holds it
    size: int
    hash: str = HASH_NAME
    chunk_bytes: int = CHUNK_BYTES
    chunks: list[str] = []


class _ChunkHasher:
    """Hashes a stream of bytes in pieces of ``chunk_bytes``."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self.digests: list[str] = []
        self.size = 0
        self._current = hashlib.new(HASH_NAME)
        self._filled = 0

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.chunk_bytes - self._filled)
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.chunk_bytes:
                self._finish_chunk()

    def _finish_chunk(self) -> None:
        self.digests.append(self._current.hexdigest())
        self._current = hashlib.new(HASH_NAME)
        self._filled = 0

    def digest(self, name: str) -> FileDigest:
        if self._filled or not self.digests:
            self._finish_chunk()
        return FileDigest(name=name, size=self.size, chunk_bytes=self.chunk_bytes, chunks=self.digests)


def file_digest(path: Path, name: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> FileDigest:
    """The digest of a file on disk (small files: configs, tokenizers)."""
    hasher = _ChunkHasher(chunk_bytes)
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            hasher.update(block)
    return hasher.digest(name or path.name)


def verify_file(path: Path, expected: FileDigest) -> None:
    """Raise `DamagedFileError` unless the file at ``path`` has ``expected``'s size and hashes."""
    _check_size(path, expected)
    if file_digest(path, expected.name, expected.chunk_bytes).chunks != expected.chunks:
        raise DamagedFileError(f"{path} does not match its hash: damaged or changed since it was written")


def _check_size(path: Path, expected: FileDigest) -> int:
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing")
    if expected.hash != HASH_NAME:
        raise DamagedFileError(f"{path}: hashed with {expected.hash!r}, which fastgen does not read")
    size = path.stat().st_size
    if size != expected.size:
        raise DamagedFileError(f"{path} holds {size} bytes where {expected.size} were written (truncated?)")
    return size


# -- writing ---------------------------------------------------------------------------------------


def write_tensors(
    tensors: dict[str, torch.Tensor],
    path: Path,
    metadata: dict[str, str] | None = None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> FileDigest:
    """Write ``tensors`` (any device) as a safetensors file, hashing the bytes in pieces of
    ``chunk_bytes`` as they are written; the file is synced to disk before this returns."""
    names = {dtype: name for name, dtype in _dtypes().items()}
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, tensor in ordered:
        if tensor.dtype not in names:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in a safetensors file")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    hasher = _ChunkHasher(chunk_bytes)
    with open(path, "wb") as file:
        for block in (struct.pack("<Q", len(header_bytes)), header_bytes):
            file.write(block)
            hasher.update(block)
        for _, tensor in ordered:
            data = _host_bytes(tensor)
            file.write(data)
            hasher.update(data)
        file.flush()
        os.fsync(file.fileno())
    return hasher.digest(path.name)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


# -- reading ---------------------------------------------------------------------------------------


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class LoadedTensors(NamedTuple):
    tensors: dict[str, torch.Tensor]
    stats: ReadStats  # how the bytes came in (O_DIRECT, page cache)


def read_tensors(
    path: Path, expected: FileDigest, device: torch.device, *, workers: int | None = None, direct: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path`` on ``device`` (see `load_tensors`)."""
    return load_tensors(path, expected, device, workers=workers, direct=direct).tensors


def load_tensors(
    path: Path,
    expected: FileDigest,
    device: torch.device,
    *,
    workers: int | None = None,
    io_threads: int | None = None,
    direct: bool = True,
    staged: bool | None = None,
) -> LoadedTensors:
    """The tensors of the safetensors file at ``path`` on ``device``, each a view of one buffer
    that holds the file's data, once every piece of the file is checked against ``expected``
    (`fastgen.models.file_reader.read_verified`: O_DIRECT unless ``direct=False`` or refused,
    pieces already in the page cache copied from it, ``workers`` hashing threads, ``io_threads``
    reads in flight). The buffer is host memory, read into directly, and copied whole to another
    ``device``; staged (by default on a GPU), pieces go through staging buffers to the device
    instead."""
    from .file_reader import read_verified

    size = _check_size(path, expected)
    with open(path, "rb", buffering=0) as file:
        # the header alone: no readahead into the data, which is read apart (O_DIRECT, in pieces)
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        prefix = _read_exactly(file, 8)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise DamagedFileError(f"{path}: its header claims {header_size} bytes, more than the file holds")
        head_size = 8 + header_size
        entries = _parse_header(path, _read_exactly(file, header_size), size - head_size)
    data, stats = read_verified(
        path, expected, device, data_start=head_size, hash_threads=workers, io_threads=io_threads,
        direct=direct, staged=staged,
    )  # fmt: skip
    return LoadedTensors({entry.name: _view(data, entry) for entry in entries}, stats)


def _read_exactly(file: Any, count: int) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise DamagedFileError(f"{file.name}: ends after {len(data)} of {count} bytes")
    return data


def _parse_header(path: Path, raw: bytes, data_size: int) -> list[_Entry]:
    dtypes = _dtypes()
    try:
        header = json.loads(raw)
        entries = [
            _Entry(name, dtypes[info["dtype"]], tuple(info["shape"]), *info["data_offsets"])
            for name, info in header.items()
            if name != "__metadata__"
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedFileError(
            f"{path}: unreadable safetensors header ({type(exc).__name__}: {exc})"
        ) from None
    entries.sort(key=lambda entry: entry.start)
    position = 0
    for entry in entries:
        count = 1
        for dim in entry.shape:
            count *= dim
        if entry.start != position or entry.end - entry.start != count * entry.dtype.itemsize:
            raise DamagedFileError(f"{path}: tensor {entry.name} has inconsistent offsets in the header")
        position = entry.end
    if position != data_size:
        raise DamagedFileError(
            f"{path}: the header describes {position} bytes of data, the file holds {data_size}"
        )
    return entries


def _view(data: torch.Tensor, entry: _Entry) -> torch.Tensor:
    part = data[entry.start : entry.end]
    if part.storage_offset() % entry.dtype.itemsize:
        part = part.clone()  # not aligned to its element size (a file from another writer)
    return part.view(entry.dtype).view(entry.shape)
