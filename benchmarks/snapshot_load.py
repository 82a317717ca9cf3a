"""Start-up from a checkpoint vs from its fastgen snapshot, cold and warm page cache, against the
disk's read bandwidth measured in the same run.

    python benchmarks/snapshot_load.py --out benchmarks/results/snapshot_load-cpu-DATE.md   # default model
    python benchmarks/snapshot_load.py --model-shape llama2-7b --quantization none,fp8 --quick \\
        --work-dir /tmp/snapbench --out $OUT/snapshot_load-h100.md                          # GPU

The source is ``--model`` (a Hugging Face directory or a GGUF file; default: the default model) or
``--model-shape``: a Hugging Face checkpoint of that shape (``--num-layers`` fewer layers) with
random bf16 weights, written once to ``--work-dir`` (drawn on the GPU when there is one). For each
``--quantization`` (``none``, ``fp8``) its snapshot is made once beside it.

Each run is a fresh process that starts an `AsyncEngine` and asks for one token; it reports the
seconds from its spawn to: imports done, weights loaded, engine ready, first token, and how long
the weights took (the model's build: read + convert/quantize, or the snapshot's read + hash check;
the snapshot's own log line, in the report, says how its bytes came in: O_DIRECT, page cache).
A first, unmeasured start, made while the snapshots are written, fills the caches every run
shares (Python bytecode, compiled kernels, a GGUF's tokenizer).

Cold: the files the engine reads (the model's; a GGUF source's cached tokenizer) are dropped from
the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``fsync`` (no root needed; the
Python packages stay cached); ``mincore`` then says how much of them is still resident (reported).
Warm: the files are read once before the run.

The ceiling, measured in the same run on the (largest) snapshot's weight files: the disk, read
with ``O_DIRECT`` (no page cache) and read cold after the eviction, 32 MiB at a time; the page
cache, read warm. The goal: a snapshot's weights within 1.3x of bytes / the faster disk figure
(cold) or bytes / the page-cache figure (warm), and a snapshot start beating the checkpoint's
wherever the checkpoint is converted or quantized at load.

Writes a table to stdout, markdown to ``--out`` (a ``.md`` path, or a directory: a dated name in
it) and JSON beside it; ``--append`` adds a section to an existing file.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import datetime
import json
import logging
import mmap
import os
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
READ_BLOCK_BYTES = 32 << 20
GOAL_RATIO = 1.3
PROFILE_LINES = 25  # the calls of most cumulative time a profiled build reports


# -- the page cache and the disk ---------------------------------------------------------------------


def files_of(path: Path) -> list[Path]:
    """The files an engine reads for ``path`` (a file, or a directory's files)."""
    if path.is_file():
        return [path]
    return sorted(file for file in path.rglob("*") if file.is_file())


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (dirty pages are written first: only clean pages go)."""
    from fastgen.models.file_reader import drop_from_page_cache

    for file in files:
        drop_from_page_cache(file)


def resident_fraction(files: list[Path]) -> float | None:
    """The share of ``files``' pages in the page cache (``mincore`` on a mapping; None where the
    C library cannot be reached)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for file in files:
        size = file.stat().st_size
        if not size:
            continue
        descriptor = os.open(file, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                return None
            pages = (size + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            failed = libc.mincore(address, size, vector)
            libc.munmap(address, size)
            if failed:
                return None
            flags = bytes(vector)
            resident += pages - flags.count(0)  # bit 0: resident; the other bits are reserved
            total += pages
        finally:
            os.close(descriptor)
    return resident / total if total else 0.0


def buffered_read_s(files: list[Path]) -> float:
    """Seconds to read ``files`` sequentially through the page cache into one reused buffer."""
    buffer = memoryview(bytearray(READ_BLOCK_BYTES))
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def direct_read_s(files: list[Path]) -> float | None:
    """Seconds to read ``files`` with ``O_DIRECT`` (from the disk, whatever the page cache holds);
    None where the file system refuses it."""
    buffer = mmap.mmap(-1, READ_BLOCK_BYTES)  # page-aligned, as O_DIRECT wants
    started = time.perf_counter()
    try:
        for file in files:
            descriptor = os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                while os.readv(descriptor, [buffer]):
                    pass
            finally:
                os.close(descriptor)
    except OSError:
        return None
    return time.perf_counter() - started


def disk_ceiling(files: list[Path], repeats: int) -> dict[str, Any]:
    """Read bandwidths of ``files`` (bytes/s, the best of ``repeats``): O_DIRECT, buffered after
    eviction (cold), buffered again (warm); the disk figure is the faster of the first two."""
    size = sum(file.stat().st_size for file in files)
    direct, cold, warm, resident = [], [], [], []
    for _ in range(repeats):
        if (seconds := direct_read_s(files)) is not None:
            direct.append(size / seconds)
        evict(files)
        resident.append(resident_fraction(files))
        cold.append(size / buffered_read_s(files))
        warm.append(size / buffered_read_s(files))
    disk = max(direct + cold)
    return {
        "bytes": size,
        "direct_bytes_per_s": max(direct) if direct else None,
        "cold_bytes_per_s": max(cold),
        "warm_bytes_per_s": max(warm),
        "disk_bytes_per_s": disk,
        "disk_method": "O_DIRECT" if direct and max(direct) >= max(cold) else "buffered after fadvise",
        "resident_after_evict": resident,
        "samples": {"direct": direct, "cold": cold, "warm": warm},
    }


# -- sources and snapshots ---------------------------------------------------------------------------


def write_random_checkpoint(directory: Path, shape: str, num_layers: int | None) -> Path:
    """A Hugging Face checkpoint of ``shape`` (``num_layers`` layers when given) with random bf16
    weights (std 0.02, norms 1) in safetensors shards of up to 4 GiB with an index, written once
    (a ``.complete`` marker says it is whole)."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from fastgen.layers.parallel import SINGLE
    from fastgen.models import model_class_for
    from fastgen.models.config import ModelConfig
    from fastgen.models.loader import _checkpoint_tensors

    sys.path.insert(0, str(HERE))
    from workloads import write_model_dir

    marker = directory / ".complete"
    wanted = f"{shape} layers={num_layers}"
    if marker.is_file() and marker.read_text() == wanted:
        return directory
    write_model_dir(directory, shape)
    config_file = directory / "config.json"
    config_json = json.loads(config_file.read_text())
    config_json["torch_dtype"] = "bfloat16"  # what is written below
    if num_layers:
        config_json["num_hidden_layers"] = num_layers
    config_file.write_text(json.dumps(config_json, indent=2))
    config = ModelConfig.from_pretrained(directory)
    with torch.device("meta"):
        unsharded = model_class_for(config)(config, SINGLE, 16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    names = [
        (name, shape_)
        for name, shape_, _, _ in _checkpoint_tensors(unsharded)
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor_shape in tqdm(names, desc="random weights", unit="tensor"):
        if "norm" in name:
            tensor = torch.ones(tensor_shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(tensor_shape, dtype=torch.bfloat16, device=device)
            tensor = tensor.normal_(0.0, 0.02, generator=generator).cpu()
        if shard_bytes and shard_bytes + tensor.nbytes > 4 << 30:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    weight_map = {}
    for index, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard")):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index_json = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    evict(files_of(directory))  # syncs what was written
    marker.write_text(wanted)
    return directory


def ensure_snapshot(source: str, directory: Path, options: dict[str, Any]) -> float | None:
    """Make the snapshot of ``source`` for ``options`` in ``directory`` unless one made for the
    same source and options is there; the seconds its making took (None when reused)."""
    from fastgen.models.snapshot import is_snapshot, read_manifest, snapshot

    if is_snapshot(directory):
        manifest = read_manifest(directory)
        same = (
            manifest.source == str(Path(source).resolve())
            and manifest.options.get("tensor_parallel") == options.get("tensor_parallel", 1)
            and manifest.options.get("quantization") == options.get("quantization")
            and options.get("dtype", "auto") in ("auto", manifest.options.get("dtype"))
        )
        if same:
            return None
        raise SystemExit(f"{directory} holds a snapshot of another source or for other options: remove it")
    started = time.perf_counter()
    snapshot(source, directory, show_progress=True, **options)
    evict(files_of(directory))
    return time.perf_counter() - started


# -- the child: one engine start ------------------------------------------------------------------


async def start_once(
    model: str, options: dict[str, Any], spawned_at: float, profile: bool = False
) -> dict[str, Any]:
    """Start an engine on ``model``, ask for one token; seconds since ``spawned_at`` at each stage.
    ``profile``: also where the model's build spent its time (cProfile, by cumulative time)."""

    def since() -> float:
        return time.time() - spawned_at

    result: dict[str, Any] = {"interpreter_s": since()}
    import torch

    import fastgen.runner as runner_module
    from fastgen import AsyncEngine, EngineConfig, SamplingParams

    result["imported_s"] = since()
    build_model = runner_module.build_model

    def timed_build(*args: Any, **kwargs: Any) -> Any:  # the in-process executor builds here
        result["weights_start_s"] = since()
        started = time.perf_counter()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        built = build_model(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result["weights_s"] = time.perf_counter() - started
        if profiler:
            profiler.disable()
            result["profile"] = profile_lines(profiler)
        result["weights_done_s"] = since()
        return built

    runner_module.build_model = timed_build
    notes: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    snapshot_logger = logging.getLogger("fastgen.models.snapshot")  # the read's own GB/s
    snapshot_logger.addHandler(handler)
    snapshot_logger.setLevel(logging.INFO)
    result["notes"] = notes
    engine = await AsyncEngine.start(model, EngineConfig(**options))
    result["ready_s"] = since()
    try:
        async for out in engine.generate("The capital of France is", SamplingParams(max_new_tokens=1)):
            if out.token_ids and "first_token_s" not in result:
                result["first_token_s"] = since()
        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    finally:
        await engine.stop()
    return result


def profile_lines(profiler: cProfile.Profile, count: int = PROFILE_LINES) -> list[str]:
    """The ``count`` calls of most cumulative time: seconds, calls and where."""
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)  # type: ignore[attr-defined]
    lines = []
    for (file, line, function), (_, calls, _, cumulative, _) in rows[:count]:
        where = function if file == "~" else f"{Path(file).name}:{line} {function}"
        lines.append(f"{cumulative:8.3f} s {calls:7d} x {where}")
    return lines


def child_main(args: argparse.Namespace) -> None:
    result = asyncio.run(start_once(args.child, json.loads(args.options), args.spawned_at, args.profile))
    Path(args.result).write_text(json.dumps(result))


# -- the parent ----------------------------------------------------------------------------------------


class Child:
    """One engine start in a fresh process (`finish` waits for its stages, or an error)."""

    def __init__(self, model: str, options: dict[str, Any], env: dict[str, str], *, profile: bool = False):
        handle, self.result_path = tempfile.mkstemp(suffix=".json", prefix="fastgen-snapshot-load-")
        os.close(handle)
        self.spawned_at = time.time()
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child", model, "--options", json.dumps(options),
            "--result", self.result_path, "--spawned-at", repr(self.spawned_at),
        ]  # fmt: skip
        if profile:
            command.append("--profile")
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )

    def finish(self, timeout_s: float) -> dict[str, Any]:
        try:
            _, stderr = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return {"error": f"killed after {timeout_s:.0f} s"}
        finally:
            ended_at = time.time()
        try:
            if self.process.returncode != 0:
                return {"error": f"exited with {self.process.returncode}: {stderr[-2000:]}"}
            result = json.loads(Path(self.result_path).read_text())
        finally:
            os.unlink(self.result_path)
        result["process_s"] = ended_at - self.spawned_at
        return result


def gguf_tokenizer_cache(source: Path) -> list[Path]:
    """The cached tokenizer a GGUF source's engine reads (nothing for other sources)."""
    if source.suffix != ".gguf":
        return []
    from fastgen.models.gguf import tokenizer_cache_dir

    return files_of(tokenizer_cache_dir()) if tokenizer_cache_dir().is_dir() else []


def median_row(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [run for run in runs if "error" not in run]
    row: dict[str, Any] = {"run": label, "samples": runs}
    if not good:
        row["error"] = runs[0]["error"] if runs else "not run"
        return row
    for key in ("imported_s", "weights_start_s", "weights_s", "ready_s", "first_token_s", "resident_before"):
        values = [run[key] for run in good if run.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    return row


def converts_at_load(source: str, quantization: str, engine_dtype: str) -> bool:
    """Whether loading ``source`` converts its weights: dequantizes a GGUF file, quantizes, or casts
    to another dtype (fusing QKV and gate/up projections, a copy, does not count)."""
    if source.endswith(".gguf") or quantization != "none":
        return True
    config = Path(source) / "config.json"
    stored = json.loads(config.read_text()).get("torch_dtype") if config.is_file() else None
    return stored is not None and stored != engine_dtype


def goal_lines(
    rows: dict[str, dict[str, Any]], snapshots: dict[str, dict[str, Any]], source: str
) -> list[str]:
    """The goal check, one line per quantization and cache state."""
    lines = []
    for quantization, info in snapshots.items():
        converts = converts_at_load(source, quantization, info["dtype"])
        for cache in ("cold", "warm"):
            checkpoint = rows.get(f"{quantization} source {cache}")
            snap = rows.get(f"{quantization} snapshot {cache}")
            if not checkpoint or not snap or "error" in checkpoint or "error" in snap:
                continue
            parts = [f"first token {checkpoint['first_token_s']:.2f} -> {snap['first_token_s']:.2f} s"]
            if checkpoint.get("weights_s") and snap.get("weights_s"):
                parts.append(f"weights {checkpoint['weights_s']:.2f} -> {snap['weights_s']:.2f} s")
            ratio_first = snap["first_token_s"] / checkpoint["first_token_s"]
            if ratio_first < 0.97:
                verdict = f"snapshot first token {100 * (1 - ratio_first):.0f}% sooner"
            elif ratio_first > 1.03:
                verdict = f"snapshot first token {100 * (ratio_first - 1):.0f}% LATER"
            else:
                verdict = "the same first token within 3%"
            verdict += " (the checkpoint is converted at load)" if converts else " (no conversion at load)"
            ratio = snap.get("vs_ceiling")
            if ratio is not None:
                met = "met" if ratio <= GOAL_RATIO else "NOT met"
                verdict += f"; weights at {ratio:.2f}x bytes / bandwidth ({met}, goal <= {GOAL_RATIO}x)"
            lines.append(f"- {quantization}, {cache}: " + ", ".join(parts) + f": {verdict}")
    return lines


def markdown(data: dict[str, Any]) -> str:
    ceiling = data["ceiling"]
    gb = 1e9
    direct = ceiling["direct_bytes_per_s"]
    lines = [
        f"## {data['title']}",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}; device: {data['device']}; machine: {data['machine']}",
        f"- versions: {data['versions']}",
        f"- source: `{data['source']}` ({data['source_bytes'] / gb:.3f} GB)",
        *[
            f"- snapshot ({q}): `{info['path']}`, {info['bytes'] / gb:.3f} GB of weights"
            + (f", made in {info['made_s']:.1f} s" if info.get("made_s") else "")
            for q, info in data["snapshots"].items()
        ],
        f"- engine options: {data['options']}",
        f"- cold = the model's files dropped from the page cache (fsync + posix_fadvise DONTNEED, no "
        f"root); resident afterwards per mincore: {data['resident_note']}",
        f"- read bandwidth of {ceiling['bytes'] / gb:.2f} GB of snapshot files, 32 MiB reads, best of "
        f"{len(ceiling['samples']['cold'])}: O_DIRECT "
        + (f"{direct / gb:.2f} GB/s" if direct else "refused by the file system")
        + f", buffered cold {ceiling['cold_bytes_per_s'] / gb:.2f} GB/s, page cache (warm) "
        f"{ceiling['warm_bytes_per_s'] / gb:.2f} GB/s; the disk ceiling is {ceiling['disk_method']}",
        "- seconds from a fresh process's spawn; weights start: after imports, config, device set-up (the "
        "tokenizer loads beside the weights); weights = the model's build (read + dequantize/convert/"
        "quantize, or the snapshot's read + hash check); median of "
        f"{data['repeats']} run(s) each; vs ceiling = weights / (snapshot bytes / disk or page-cache "
        "bandwidth)",
        "",
        "| run | imports done | weights start | weights | ready | first token | vs ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        if "error" in row:
            lines.append(f"| {row['run']} | error: {row['error'][:200]!r} | | | | | |")
            continue
        weights = "?" if row.get("weights_s") is None else f"{row['weights_s']:.2f}"
        start = "?" if row.get("weights_start_s") is None else f"{row['weights_start_s']:.2f}"
        ratio = row.get("vs_ceiling")
        lines.append(
            f"| {row['run']} | {row['imported_s']:.2f} | {start} | {weights} | {row['ready_s']:.2f} | "
            f"{row['first_token_s']:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines += ["", "Goal check:", "", *(data["goal"] or ["- not measured"])]
    reads = [
        f"- {row['run']}: {note}"
        for row in data["rows"]
        for run in row.get("samples", [])[:1]
        for note in run.get("notes", [])
        if "read and verified" in note
    ]
    if reads:
        lines += ["", "The snapshot reads' own log (first run of each):", "", *reads]
    for row in data["rows"]:
        profile = next((run["profile"] for run in row.get("samples", []) if run.get("profile")), None)
        if profile:
            lines += ["", f"Where the weights window went, {row['run']} (cProfile, cumulative):", "", "```"]
            lines += [*profile, "```"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: the default model)")
    parser.add_argument("--model-shape", default=None, help="instead: a random bf16 checkpoint of this shape")
    parser.add_argument("--num-layers", type=int, default=None, help="with --model-shape: this many layers")
    parser.add_argument("--quantization", default="none", help="comma-separated: none, fp8")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastgen-snapshot-bench"
    )
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (the median is reported)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="GPU budget: 8 layers unless --num-layers, 1 repeat, no CUDA graphs, 256 KV blocks",
    )
    parser.add_argument("--time-limit-s", type=float, default=3000.0, help="skip the runs left after this")
    parser.add_argument("--run-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--only", default=None, help='run only the cases whose label holds this, e.g. "snapshot cold"'
    )
    parser.add_argument("--profile-build", action="store_true", help="profile each start's model build")
    parser.add_argument("--out", type=Path, default=RESULTS, help="a .md path, or a directory")
    parser.add_argument("--append", action="store_true", help="add a section to an existing --out file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.no_cuda_graphs = True
        args.num_kv_blocks = args.num_kv_blocks or 256
        if args.model_shape and args.num_layers is None:
            args.num_layers = 8
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    from tqdm.auto import tqdm

    started = time.monotonic()
    sys.path.insert(0, str(HERE))
    from serving import _versions

    from fastgen.models.checkpoint import resolve_model

    command = "python benchmarks/snapshot_load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.model_shape:
        layers = f"-{args.num_layers}L" if args.num_layers else ""
        checkpoint = args.work_dir / f"{args.model_shape}{layers}-hf"
        source = str(write_random_checkpoint(checkpoint, args.model_shape, args.num_layers))
    else:
        source = str(resolve_model(args.model))
    quantizations = [q.strip() for q in args.quantization.split(",") if q.strip()]
    base_options: dict[str, Any] = {"dtype": args.dtype, "tensor_parallel": 1}
    engine_extra: dict[str, Any] = {"max_model_len": args.max_model_len}
    if args.num_kv_blocks:
        engine_extra["num_kv_blocks"] = args.num_kv_blocks
    if args.no_cuda_graphs:
        engine_extra["cuda_graphs"] = False
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # the first start fills the caches every later one shares (bytecode, compiled kernels, a GGUF's
    # tokenizer): it runs, unmeasured, while the snapshots are made (a small KV cache: beside them)
    first = quantizations[0]
    prime_options = dict(base_options, quantization=None if first == "none" else first, **engine_extra)
    prime = Child(source, {**prime_options, "num_kv_blocks": 128}, env)
    name = Path(source).name.removesuffix(".gguf")
    snapshots: dict[str, dict[str, Any]] = {}
    for quantization in quantizations:
        options = dict(base_options, quantization=None if quantization == "none" else quantization)
        directory = args.work_dir / f"{name}-snapshot-{args.dtype}-{quantization}"
        made_s = ensure_snapshot(source, directory, options)
        weights = sorted(directory.glob("*.safetensors"))
        manifest = json.loads((directory / "fastgen-snapshot.json").read_text())
        snapshots[quantization] = {
            "dtype": manifest["options"]["dtype"],
            "path": str(directory),
            "options": options,
            "made_s": made_s,
            "bytes": sum(file.stat().st_size for file in weights),
            "weight_files": weights,
        }
    primed = prime.finish(args.run_timeout_s)
    print(f"first start (unmeasured): {primed.get('error', 'done')}", file=sys.stderr)
    largest = max(snapshots.values(), key=lambda info: info["bytes"])
    ceiling = disk_ceiling(largest["weight_files"], repeats=1 if args.quick else 2)
    print(
        f"read bandwidth: O_DIRECT {(ceiling['direct_bytes_per_s'] or 0) / 1e9:.2f} GB/s, buffered cold "
        f"{ceiling['cold_bytes_per_s'] / 1e9:.2f} GB/s, warm {ceiling['warm_bytes_per_s'] / 1e9:.2f} GB/s",
        file=sys.stderr,
    )
    source_files = files_of(Path(source)) + gguf_tokenizer_cache(Path(source))
    plan: list[tuple[str, str, dict[str, Any], str]] = []
    for _ in range(args.repeats):
        for quantization in quantizations:
            options = dict(snapshots[quantization]["options"], **engine_extra)
            for label, model in (("source", source), ("snapshot", snapshots[quantization]["path"])):
                for cache in ("cold", "warm"):
                    case = f"{quantization} {label} {cache}"
                    if args.only is None or args.only in case:
                        plan.append((case, model, options, cache))
    runs: dict[str, list[dict[str, Any]]] = {}
    residents: list[float] = []
    for label, model, options, cache in tqdm(plan, desc="engine starts", unit="start"):
        if time.monotonic() - started > args.time_limit_s:
            runs.setdefault(label, []).append({"error": "skipped: --time-limit-s reached"})
            continue
        files = source_files if model == source else files_of(Path(model))
        if cache == "cold":
            evict(files)
            resident = resident_fraction(files)
            if resident is not None:
                residents.append(resident)
        else:
            buffered_read_s(files)
            resident = resident_fraction(files)
        run = Child(model, options, env, profile=args.profile_build).finish(args.run_timeout_s)
        run["resident_before"] = resident
        runs.setdefault(label, []).append(run)
        shown = {k: round(v, 2) for k, v in run.items() if k.endswith("_s") and isinstance(v, float)}
        tqdm.write(f"{label}: {run.get('error', shown)}", file=sys.stderr)
    rows = {label: median_row(label, label_runs) for label, label_runs in runs.items()}
    for quantization, info in snapshots.items():
        for cache, speed in (("cold", ceiling["disk_bytes_per_s"]), ("warm", ceiling["warm_bytes_per_s"])):
            row = rows.get(f"{quantization} snapshot {cache}")
            if row and row.get("weights_s"):
                row["vs_ceiling"] = row["weights_s"] / (info["bytes"] / speed)
    stamp = datetime.datetime.now(datetime.UTC)
    device = next((run["device"] for r in runs.values() for run in r if "device" in run), "unknown")
    title = f"{Path(source).name} on {device}: {', '.join(quantizations)}"
    data = {
        "title": title,
        "command": command,
        "date": stamp.isoformat(timespec="seconds"),
        "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}",
        "versions": _versions(),
        "source": source,
        "source_bytes": sum(file.stat().st_size for file in files_of(Path(source))),
        "snapshots": {
            q: {k: v for k, v in info.items() if k != "weight_files"} for q, info in snapshots.items()
        },
        "options": {**base_options, **engine_extra},
        "repeats": args.repeats,
        "ceiling": ceiling,
        "resident_note": (
            f"{100 * max(residents):.1f}% at most over the cold runs" if residents else "mincore unavailable"
        ),
        "rows": list(rows.values()),
        "goal": goal_lines(rows, snapshots, source),
        "elapsed_s": time.monotonic() - started,
    }
    out = args.out
    if out.suffix != ".md":
        device_name = "cpu" if device == "cpu" else "".join(c if c.isalnum() else "-" for c in device.lower())
        out = out / f"snapshot_load-{device_name}-{stamp:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(data)
    json_path = out.with_suffix(".json")
    sections = json.loads(json_path.read_text()) if args.append and json_path.is_file() else []
    json_path.write_text(json.dumps([*sections, data], indent=1, default=str))
    if args.append and out.is_file():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + report + "\n")
    else:
        heading = "# Start-up: checkpoint vs fastgen snapshot, cold and warm page cache\n\n"
        out.write_text(heading + report + "\n")
    print(report)
    print(f"\nwritten: {out} (JSON: {json_path}); {data['elapsed_s']:.0f} s in all")
    return 0 if all("error" not in row for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
