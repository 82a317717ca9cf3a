"""A snapshot's weight file read in this process by two implementations in turn, cold and warm:
``--old`` names another checkout's ``fastgen/models/safetensors_io.py`` (its ``read_tensors``),
against this checkout's `load_tensors`. Taking turns round by round keeps a busy machine's drift
out of the comparison (the engine-start benchmark, snapshot_load.py, runs one case after another).

    git archive 7125be2 | tar -x -C /tmp/old
    python benchmarks/snapshot_read_ab.py --old /tmp/old/fastgen/models/safetensors_io.py SNAPSHOT...
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from fastgen.models.file_reader import drop_from_page_cache
from fastgen.models.safetensors_io import load_tensors
from fastgen.models.snapshot import read_manifest


def drop(file: Path, warm: bool) -> None:
    """Cold: out of the page cache (fsync + POSIX_FADV_DONTNEED); warm: read through it once."""
    if warm:
        with open(file, "rb") as handle:
            while handle.read(32 << 20):
                pass
        return
    drop_from_page_cache(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshots", nargs="+", type=Path)
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("old_safetensors_io", args.old)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    cpu = torch.device("cpu")
    print("| snapshot file | GB | cache | old s (GB/s) | new s (GB/s) | new: how the bytes came in | load |")
    print("|---|---|---|---|---|---|---|")
    for snapshot in args.snapshots:
        digest = read_manifest(snapshot).ranks[0]
        old_digest = old.FileDigest(**{k: getattr(digest, k) for k in digest.__struct_fields__})
        file = snapshot / digest.name
        for cache in ("cold", "warm"):
            seconds: dict[str, list[float]] = {"old": [], "new": []}
            how = ""
            loads = []
            loaded: object = None
            loaded = None
            for _ in range(args.rounds):
                for side in ("old", "new"):
                    drop(file, cache == "warm")
                    started = time.perf_counter()
                    if side == "old":
                        tensors = old.read_tensors(file, old_digest, cpu)
                    else:
                        loaded = load_tensors(file, digest, cpu)
                        tensors, how = loaded.tensors, loaded.stats.describe()
                    seconds[side].append(time.perf_counter() - started)
                    loads.append(os.getloadavg()[0])
                    del tensors  # the mapping or buffer goes before the next read
                    loaded = None
            gb = digest.size / 1e9
            old_s, new_s = statistics.median(seconds["old"]), statistics.median(seconds["new"])
            print(
                f"| {snapshot.name} | {gb:.2f} | {cache} | {old_s:.2f} ({gb / old_s:.2f}) | "
                f"{new_s:.2f} ({gb / new_s:.2f}) | {how} | {min(loads):.1f}-{max(loads):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
