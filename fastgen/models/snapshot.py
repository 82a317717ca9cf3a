"""Engine snapshots: a model saved as the engine holds it, ready to run (``fastgen snapshot``).

A snapshot directory holds, for each tensor-parallel rank, that rank's shard of every weight in the
engine's own layout (fused QKV and gate-up projections, FP8 values and their row scales when
quantized) as one safetensors file, plus the source's ``config.json`` (a GGUF file's config written
as one), its tokenizer files and other small files (license, README), and a manifest
(``fastgen-snapshot.json``): the engine options that shaped the weights (tensor-parallel size,
dtype, quantization), the fastgen version, and each file's size and hash.

Loading one (`load_snapshot_model`, which `fastgen.models.loader.build_model` calls for a snapshot
directory) builds the model's modules with their parameters on the meta device (no memory, no
initialization) while it reads the rank's file straight into one buffer on the rank's device, checking
its hash as it reads (`fastgen.models.safetensors_io`, `fastgen.models.file_reader`: O_DIRECT
reads, hashed on other threads), and makes each parameter a view of that buffer: no conversion,
no re-sharding, no re-quantization. A snapshot made for other options, or by another fastgen
version, is refused with `SnapshotMismatchError` naming what differs; a damaged file is refused
with `DamagedFileError` before the engine serves.

Anything the engine loads becomes a snapshot: a Hugging Face directory (safetensors or ``.bin``),
a GGUF file, or dummy weights.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from fastgen.errors import ModelLoadError

from .safetensors_io import DamagedFileError, FileDigest, file_digest, verify_file

MANIFEST_NAME = "fastgen-snapshot.json"
FORMAT = "fastgen-snapshot"
FORMAT_VERSION = 1
# the engine options that change the tensors of a snapshot: it is refused when any differs
SHAPING_OPTIONS = ("tensor_parallel", "dtype", "quantization")
# files of a source directory that are not copied into a snapshot (its weights are)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "DamagedFileError",
    "Manifest",
    "SnapshotMismatchError",
    "check_snapshot",
    "is_snapshot",
    "load_snapshot_model",
    "read_manifest",
    "snapshot",
]


class SnapshotMismatchError(ModelLoadError):
    """A snapshot made for other engine options (or by another fastgen version) than the engine's."""


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    fastgen_version: str
    options: dict[str, Any]  # SHAPING_OPTIONS; dtype as resolved ("bfloat16", not "auto")
    model_type: str
    ranks: list[FileDigest]  # one safetensors file per tensor-parallel rank, in rank order
    files: list[FileDigest]  # config.json, tokenizer and other small files
    source: str = ""  # what the snapshot was made from (for people)
    created: str = ""
    created_on: str = ""  # the device type that built the weights
    torch_version: str = ""


def is_snapshot(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the snapshot at ``path``; `SnapshotMismatchError` for another format or
    fastgen version, `DamagedFileError` for an unreadable one."""
    import fastgen

    file = Path(path) / MANIFEST_NAME
    try:
        raw = json.loads(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise DamagedFileError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DamagedFileError(f"{file} is not a fastgen snapshot manifest")
    made = (raw.get("format_version"), raw.get("fastgen_version"))
    if made != (FORMAT_VERSION, fastgen.__version__):
        raise SnapshotMismatchError(
            f"snapshot {path} was made by fastgen {made[1]} (snapshot format {made[0]}); this is fastgen "
            f"{fastgen.__version__} (format {FORMAT_VERSION}): make the snapshot again with this version"
        )
    try:
        return msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise DamagedFileError(f"{file}: {exc}") from None


def check_snapshot(path: str | Path) -> Manifest:
    """Check what is cheap before anything loads (the engine process does, through
    `fastgen.models.checkpoint.resolve_model`): the manifest, the hashes of the small files, and
    that each rank's file is there with its size. Each rank checks its file's hash as it loads."""
    manifest = read_manifest(path)
    for digest in manifest.files:
        verify_file(Path(path) / digest.name, digest)
    for digest in manifest.ranks:
        file = Path(path) / digest.name
        if not file.is_file():
            raise DamagedFileError(f"{file} is missing")
        if file.stat().st_size != digest.size:
            raise DamagedFileError(
                f"{file} holds {file.stat().st_size} bytes where {digest.size} were written (truncated?)"
            )
    return manifest


def check_options(path: str | Path, manifest: Manifest, **engine: Any) -> None:
    """Raise `SnapshotMismatchError` naming every option in ``engine`` (`SHAPING_OPTIONS`) that
    differs from the snapshot's."""
    made_for = manifest.options
    differ = [name for name in SHAPING_OPTIONS if name in engine and made_for.get(name) != engine[name]]
    if differ:
        made = ", ".join(f"{name}={made_for.get(name)}" for name in differ)
        wanted = ", ".join(f"{name}={engine[name]}" for name in differ)
        raise SnapshotMismatchError(
            f"snapshot {path} was made for {made}; this engine runs {wanted}. Start the engine with the "
            f"snapshot's options, or make a snapshot for these ({_snapshot_command(manifest, engine)})"
        )


def _snapshot_command(manifest: Manifest, engine: dict[str, Any]) -> str:
    flags = [f"--tensor-parallel {engine.get('tensor_parallel', manifest.options['tensor_parallel'])}"]
    flags.append(f"--dtype {engine.get('dtype', manifest.options['dtype'])}")
    quantization = engine.get("quantization", manifest.options.get("quantization"))
    if quantization:
        flags.append(f"--quantization {quantization}")
    return f"fastgen snapshot {manifest.source or 'MODEL'} OUT {' '.join(flags)}"


# -- making one ------------------------------------------------------------------------------------


def snapshot(
    model: str | Path | None,
    out: str | Path,
    config: Any = None,
    *,
    show_progress: bool = True,
    **options: Any,
) -> Path:
    """Write a snapshot of ``model`` (what `AsyncEngine.start` takes: a Hugging Face directory, a
    GGUF file, None for the default model) to the new directory ``out``, for the engine options
    ``config`` (an `EngineConfig`) and ``options`` (its fields) describe. Only the options that
    shape the weights are recorded (tensor_parallel, dtype, quantization; load_format and seed
    choose what is read); an engine loading the snapshot must run with the same. The weights are
    built as the engine builds them, on the device it would use (each rank in turn, on the first
    device), and written through a staging directory: ``out`` appears complete or not at all.
    Returns ``out``."""
    import torch

    from fastgen.config import EngineConfig
    from fastgen.layers.parallel import TensorParallel
    from fastgen.runner import resolve_device, resolve_dtype

    from . import check_supported
    from .checkpoint import resolve_model
    from .config import ModelConfig
    from .loader import build_model

    config = EngineConfig.from_options(**options) if config is None else config.replace(**options)
    source = resolve_model(model, config.load_format)
    if is_snapshot(source):
        raise ModelLoadError(
            f"{source} is a snapshot already: make snapshots from the model it was made from"
        )
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; a snapshot goes into a new one")
    model_config = ModelConfig.from_pretrained(source)
    check_supported(model_config)
    device = resolve_device(config, 0)
    dtype = resolve_dtype(config, device)
    max_model_len = config.max_model_len or model_config.max_position_embeddings
    size = config.tensor_parallel
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    started = time.perf_counter()
    try:
        ranks = []
        for rank in range(size):
            built = build_model(
                source, model_config, dtype=dtype, device=device, tp=TensorParallel(rank, size),
                max_model_len=max_model_len, load_format=config.load_format, seed=config.seed,
                show_progress=show_progress and rank == 0, quantization=config.quantization,
            )  # fmt: skip
            ranks.append(_write_rank(built, staging / f"rank-{rank}-of-{size}.safetensors", rank, size))
            del built
            if device.type == "cuda":
                torch.cuda.empty_cache()
        files = _write_model_files(Path(source), staging)
        manifest = Manifest(
            fastgen_version=_fastgen_version(),
            options={
                "tensor_parallel": size,
                "dtype": str(dtype).removeprefix("torch."),
                "quantization": config.quantization,
            },
            model_type=model_config.model_type,
            ranks=ranks,
            files=files,
            source=str(Path(source).resolve()),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            created_on=device.type,
            torch_version=str(torch.__version__),
        )
        (staging / MANIFEST_NAME).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total_gb = sum(digest.size for digest in ranks) / 1e9
    logger.info(
        "snapshot of %s in %s: %.2f GB in %.1f s", source, out, total_gb, time.perf_counter() - started
    )
    return out


def _fastgen_version() -> str:
    import fastgen

    return fastgen.__version__


def _write_rank(model: Any, path: Path, rank: int, size: int) -> FileDigest:
    """Every parameter once (tied weights under their first name) and the FP8 row scales."""
    from .safetensors_io import write_tensors

    tensors = dict(model.named_parameters())
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None)
        if scale is not None:
            tensors[f"{name}.weight_scale"] = scale
    return write_tensors(tensors, path, {"format": "pt", "fastgen_rank": f"{rank} of {size}"})


def _write_model_files(source: Path, staging: Path) -> list[FileDigest]:
    """config.json and the tokenizer: a directory's small files copied as they are; a GGUF file's
    config written as config.json and its tokenizer (built from its metadata) saved."""
    from .gguf import gguf_file_in, read_config

    gguf_file = gguf_file_in(source)
    if gguf_file is not None:
        from .checkpoint import load_tokenizer

        (staging / "config.json").write_text(json.dumps(read_config(gguf_file), indent=1) + "\n")
        load_tokenizer(gguf_file).save_pretrained(str(staging))
    else:
        for file in sorted(source.iterdir()):
            weights = file.name.endswith(_WEIGHT_SUFFIXES) or file.name in _WEIGHT_INDEXES
            if file.is_file() and not weights:
                shutil.copy2(file, staging / file.name)
    names = sorted(file.name for file in staging.iterdir() if file.suffix != ".safetensors")
    return [file_digest(staging / name) for name in names]


# -- loading one -----------------------------------------------------------------------------------


def load_snapshot_model(
    path: str | Path,
    config: Any,
    *,
    dtype: Any,
    device: Any,
    tp: Any,
    max_model_len: int,
    quantization: str | None,
) -> Any:
    """The model of rank ``tp.rank`` from the snapshot at ``path`` (see the module docstring)."""
    import torch

    from .loader import assign_tensors, build_skeleton
    from .safetensors_io import load_tensors

    manifest = read_manifest(path)
    check_options(
        path,
        manifest,
        tensor_parallel=tp.size,
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization,
    )
    digest = manifest.ranks[tp.rank]
    file = Path(path) / digest.name

    def read() -> tuple[Any, Any, float]:
        began = time.perf_counter()
        tensors, how = load_tensors(file, digest, device)
        return tensors, how, time.perf_counter() - began

    # the read (disk and hashing, off the GIL) runs while the modules are built: on a GPU that build
    # is the process's first device work, its set-up included
    with ThreadPoolExecutor(1, thread_name_prefix="fastgen-snapshot-read") as reader:
        reading = reader.submit(read)
        started = time.perf_counter()
        model = build_skeleton(config, dtype=dtype, device=device, tp=tp, max_model_len=max_model_len)
        built = time.perf_counter() - started
        tensors, how, read_s = reading.result()
    assign_tensors(model, tensors, device=device, quantized=quantization == "fp8", where=str(file))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info(
        "rank %d loaded %s: %.3f GB read and verified in %.3f s (%.2f GB/s: %s) while its modules were "
        "built in %.3f s; weights ready %.3f s after the build began",
        tp.rank, digest.name, digest.size / 1e9, read_s, digest.size / 1e9 / max(read_s, 1e-9),
        how.describe(), built, time.perf_counter() - started,
    )  # fmt: skip
    return model
