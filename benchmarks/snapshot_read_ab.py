"""A snapshot's weight file read in this process by several readers in turn, cold and warm: this
checkout's `load_tensors` in each of ``--variants`` (host memory or staged through pinned buffers,
and how many reads in flight), and with ``--old`` another checkout's
``fastgen/models/safetensors_io.py`` (its ``read_tensors``). Taking turns round by round keeps a
busy machine's drift out of the comparison (the engine-start benchmark, snapshot_load.py, runs one
case after another). The disk's O_DIRECT bandwidth is measured in the same run as the ceiling.

    git archive 7125be2 | tar -x -C /tmp/old
    python benchmarks/snapshot_read_ab.py --old /tmp/old/fastgen/models/safetensors_io.py SNAPSHOT...
    python benchmarks/snapshot_read_ab.py --device cuda --variants host,staged,staged:8,staged:16 SNAPSHOT
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastgen.models.file_reader import IO_THREADS, drop_from_page_cache
from fastgen.models.safetensors_io import load_tensors
from fastgen.models.snapshot import read_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snapshot_load import direct_read_s

Reader = Callable[[], tuple[Any, str]]  # reads the file once: what keeps its tensors, how


def drop(file: Path, warm: bool) -> None:
    """Cold: out of the page cache (fsync + POSIX_FADV_DONTNEED); warm: read through it once."""
    if warm:
        with open(file, "rb") as handle:
            while handle.read(32 << 20):
                pass
        return
    drop_from_page_cache(file)


def parse_variant(text: str) -> tuple[bool | None, int]:
    """``host``, ``staged`` or ``default``, optionally ``:N`` reads in flight."""
    kind, _, threads = text.partition(":")
    staged = {"host": False, "staged": True, "default": None}[kind]
    return staged, int(threads) if threads else IO_THREADS


def readers(file: Path, args: argparse.Namespace) -> dict[str, Reader]:
    digest = read_manifest(file.parent).ranks[0]
    device = torch.device(args.device)
    sides: dict[str, Reader] = {}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_safetensors_io", args.old)
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        old_digest = old.FileDigest(**{k: getattr(digest, k) for k in digest.__struct_fields__})
        sides["old"] = lambda: (old.read_tensors(file, old_digest, device), "")
    for variant in args.variants.split(","):
        staged, threads = parse_variant(variant)

        def read(staged: bool | None = staged, threads: int = threads) -> tuple[Any, str]:
            loaded = load_tensors(file, digest, device, staged=staged, io_threads=threads)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return loaded.tensors, loaded.stats.describe()

        sides[variant] = read
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshots", nargs="+", type=Path)
    parser.add_argument("--old", type=Path, default=None)
    parser.add_argument("--variants", default="default", help="comma-separated: host|staged|default[:reads]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for snapshot in args.snapshots:
        file = snapshot / read_manifest(snapshot).ranks[0].name
        gb = file.stat().st_size / 1e9
        direct = direct_read_s([file])
        ceiling = "refused" if direct is None else f"{gb / direct:.2f} GB/s"
        print(f"\n{snapshot.name}: {gb:.2f} GB to {args.device}; O_DIRECT ceiling (one reader) {ceiling}")
        sides = readers(file, args)
        print("| cache | " + " | ".join(f"{name} s (GB/s)" for name in sides) + " | how (last) | load |")
        print("|---|" + "---|" * len(sides) + "---|---|")
        for cache in ("cold", "warm"):
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            loads, how = [], ""
            for _ in range(args.rounds):
                for name, read in sides.items():
                    drop(file, cache == "warm")
                    started = time.perf_counter()
                    kept, how = read()
                    seconds[name].append(time.perf_counter() - started)
                    loads.append(os.getloadavg()[0])
                    del kept  # the buffer goes before the next read
            medians = [statistics.median(values) for values in seconds.values()]
            cells = " | ".join(f"{median:.2f} ({gb / median:.2f})" for median in medians)
            print(f"| {cache} | {cells} | {how} | {min(loads):.1f}-{max(loads):.1f} |", flush=True)


if __name__ == "__main__":
    main()
