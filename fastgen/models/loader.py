"""Building a model and filling its weights: safetensors (single or sharded), ``*.bin``, GGUF
(dequantized, see `fastgen.models.gguf`), or random ("dummy") weights from the config alone, the
same at every tensor-parallel size. Each tensor-parallel rank keeps only its slices (of a GGUF
tensor it dequantizes the whole, then slices). A fastgen snapshot (`fastgen.models.snapshot`)
holds each rank's weights as the engine holds them: its modules are built with their parameters
on the meta device (`build_skeleton`), which then become views of the rank's file as read onto
the device (`assign_tensors`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from fastgen.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fastgen.layers.parallel import SINGLE, TensorParallel
from fastgen.layers.quantization import FP8, quantize_linear_layers

from . import adapter_for, model_class_for
from .adapter import RowBlocks
from .config import ModelConfig
from .gguf import gguf_file_in
from .gguf import iterate_tensors as iterate_gguf_tensors

# the layers whose weights ``quantization="fp8"`` stores in FP8 (with ``weight_scale`` beside them)
QUANTIZED_LAYERS = (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    path: str | Path | None,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: TensorParallel,
    max_model_len: int,
    load_format: str = "auto",
    seed: int = 0,
    show_progress: bool = True,
    quantization: str | None = None,
) -> nn.Module:
    """Construct ``config``'s model on ``device`` in ``dtype`` and load (or draw) its weights;
    ``quantization="fp8"`` then turns the linear layers' weights into FP8 (see
    `fastgen.layers.quantization`). ``path`` may be a snapshot directory made for these options."""
    from .snapshot import is_snapshot, load_snapshot_model

    if load_format != "dummy" and is_snapshot(path):
        return load_snapshot_model(
            path, config, dtype=dtype, device=device, tp=tp, max_model_len=max_model_len,
            quantization=quantization,
        )  # fmt: skip
    cls = model_class_for(config)
    with _default_dtype(dtype), device:
        model = cls(config, tp, max_model_len)
    model.eval()
    if load_format == "dummy":
        with _default_dtype(dtype), torch.device("meta"):
            unsharded = cls(config, SINGLE, max_model_len)  # shapes only, no memory
        fill_dummy_weights(model, unsharded, seed)
    else:
        load_weights(model, Path(path), load_format, show_progress=show_progress)
    if quantization == "fp8":
        quantize_linear_layers(model, QUANTIZED_LAYERS)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model-dtype weights' memory goes back to the KV cache
    return model


class _ParametersOnMeta(TorchFunctionMode):
    """While modules are built: the tensors they create empty or constant (``torch.empty``,
    ``zeros``, ``ones`` and their ``_like`` forms: parameters to be filled, placeholders) go to the
    meta device, without memory or initialization; tensors they compute (rotary tables) are made
    on the device as usual."""

    _PLACEHOLDERS = frozenset({torch.empty, torch.zeros, torch.ones})
    _LIKE = frozenset({torch.empty_like, torch.zeros_like, torch.ones_like})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._LIKE:
            # as a plain ``empty``: a ``_like`` op on a meta tensor runs torch's Python meta
            # kernels, whose first use imports the symbolic-shapes machinery (seconds)
            like = args[0]
            dtype = kwargs.get("dtype") or like.dtype
            return torch.empty(like.shape, dtype=dtype, device="meta")
        if func in self._PLACEHOLDERS:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_skeleton(
    config: ModelConfig, *, dtype: torch.dtype, device: torch.device, tp: TensorParallel, max_model_len: int
) -> nn.Module:
    """``config``'s model for rank ``tp.rank`` with every parameter on the meta device and its
    computed buffers on ``device``; `assign_tensors` gives it its weights."""
    cls = model_class_for(config)
    with _default_dtype(dtype), device, _ParametersOnMeta():
        model = cls(config, tp, max_model_len)
    return model.eval()


class _Slot(NamedTuple):
    """Where a snapshot tensor goes: the shape and dtype it must have, the modules' attributes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    holders: list[tuple[nn.Module, str]]


def assign_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], *, device: torch.device, quantized: bool, where: str
) -> None:
    """Make ``tensors`` the weights of ``model`` (built by `build_skeleton`) as they are, without a
    copy: a parameter's tensor is named as the parameter (tied ones under their first name), an
    FP8 layer's scales ``<layer>.weight_scale``. Each must have its parameter's shape and dtype
    (FP8 for the weights of `QUANTIZED_LAYERS` when ``quantized``); a tensor missing, left over
    or of another shape raises `SnapshotMismatchError` naming it (``where`` names the file)."""
    from .snapshot import SnapshotMismatchError

    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # a parameter -> every (module, attribute)
    for module in model.modules():
        for attribute, param in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(param), []).append((module, attribute))
    slots: dict[str, _Slot] = {}
    for name, param in model.named_parameters():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        fp8 = quantized and attribute == "weight" and isinstance(module, QUANTIZED_LAYERS)
        slots[name] = _Slot(tuple(param.shape), FP8 if fp8 else param.dtype, holders[id(param)])
        if fp8:
            slots[f"{module_name}.weight_scale"] = _Slot(
                (param.shape[0], 1), torch.float32, [(module, "weight_scale")]
            )
    problems = {
        "missing": sorted(set(slots) - set(tensors)),
        "unexpected": sorted(set(tensors) - set(slots)),
        "of another shape or dtype": [
            f"{name} {tuple(tensor.shape)} {tensor.dtype} where {slots[name].shape} {slots[name].dtype}"
            for name, tensor in sorted(tensors.items())
            if name in slots and (tuple(tensor.shape), tensor.dtype) != slots[name][:2]
        ],
    }
    if any(problems.values()):
        found = "; ".join(f"{what}: {', '.join(names[:6])}" for what, names in problems.items() if names)
        raise SnapshotMismatchError(
            f"{where} does not hold this model's weights as this fastgen lays them out ({found})"
        )
    for name, slot in slots.items():
        tensor = tensors[name]
        value = tensor if name.endswith(".weight_scale") else nn.Parameter(tensor, requires_grad=False)
        for module, attribute in slot.holders:
            setattr(module, attribute, value)
    _materialize_placeholders(model, device)


def _materialize_placeholders(model: nn.Module, device: torch.device) -> None:
    """Empty placeholders built on the meta device (an attention layer's KV cache before it is
    sized) made on ``device``; anything else left on the meta device is a bug, raised here."""
    left = []
    for module_name, module in model.named_modules():
        for attribute, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                if value.numel():
                    left.append(f"{module_name}.{attribute}")
                else:
                    setattr(module, attribute, torch.empty(value.shape, dtype=value.dtype, device=device))
    left += [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: {', '.join(left[:6])} left on the meta device")


def fill_dummy_weights(model: nn.Module, unsharded: nn.Module, seed: int) -> None:
    """Random weights with the statistics of an initialized model (norms at 1) that do not depend
    on the tensor-parallel size: each tensor of the checkpoint this model would load is drawn from
    (``seed``, its name, its full shape) on the model's device, one tensor at a time, and goes
    through the same weight loaders as a real checkpoint, which keep this rank's shard.
    ``unsharded`` is the model at ``tensor_parallel=1`` on the meta device (it gives the names
    and full shapes). Every rank draws whole tensors (fast all the same: benchmarks/NOTES-runner.md);
    memory peaks at the model plus its largest tensor."""
    params = dict(model.named_parameters())
    if set(params) != {name for name, _ in unsharded.named_parameters()}:
        raise ValueError(f"{type(model).__name__}: the unsharded model has other parameters")
    for name, shape, target, shard_id in _checkpoint_tensors(unsharded):
        param = params[target]
        if "norm" in name:
            tensor = torch.ones(shape, dtype=param.dtype, device=param.device)
        else:
            generator = torch.Generator(device=param.device).manual_seed(_dummy_seed(seed, name, shape))
            tensor = torch.empty(shape, dtype=param.dtype, device=param.device)
            tensor.normal_(0.0, 0.02, generator=generator)
        param.weight_loader(param, tensor, shard_id)
        del tensor


def _checkpoint_tensors(unsharded: nn.Module) -> Iterator[tuple[str, tuple[int, ...], str, Any]]:
    """(checkpoint name, full shape, our parameter, shard id) of every tensor a checkpoint of
    ``unsharded`` holds: fused parameters (``qkv_proj``) split back into their checkpoint tensors
    (``q_proj``, ``k_proj``, ``v_proj``) in the order of ``packed_modules``, and stacked ones
    (experts) into the tensors they list themselves."""
    packed = getattr(unsharded, "packed_modules", {})
    for target, param in unsharded.named_parameters():
        if hasattr(param, "checkpoint_tensors"):
            for name, shard_id, shape in _stacked_tensors(target, param):
                yield name, shape, target, shard_id
            continue
        shards = [(source, fused, shard_id) for source, (fused, shard_id) in packed.items()]
        shards = [shard for shard in shards if f".{shard[1]}." in target]
        if not shards:
            yield target, tuple(param.shape), target, None
        for source, fused, shard_id in shards:
            name = target.replace(f".{fused}.", f".{source}.")
            yield name, _shape_read(param, shard_id), target, shard_id


class _ShapeProbe:
    """Stands in for a checkpoint tensor (as large as a whole fused parameter) and records the
    shape of what a weight loader reads from it."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.read: tuple[int, ...] | None = None

    def __getitem__(self, index: Any) -> torch.Tensor:
        part = torch.empty(self.shape, device="meta")[index]
        self.read = tuple(part.shape)
        return part


def _shape_read(param: nn.Parameter, shard_id: Any) -> tuple[int, ...]:
    """The full shape of shard ``shard_id``'s checkpoint tensor: at ``tensor_parallel=1`` a loader
    reads the whole of its checkpoint tensor, so ask the meta-device parameter's loader."""
    probe = _ShapeProbe(tuple(param.shape))
    param.weight_loader(param, probe, shard_id)
    if probe.read is None:
        raise ValueError(f"the weight loader of shard {shard_id!r} read nothing")
    return probe.read


def _dummy_seed(seed: int, name: str, shape: tuple[int, ...]) -> int:
    """A 63-bit seed from (seed, name, shape), the same in every process (unlike ``hash``)."""
    key = f"{seed}/{name}/{'x'.join(map(str, shape))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def load_weights(
    model: nn.Module, path: Path, load_format: str = "auto", *, show_progress: bool = True
) -> None:
    """Copy checkpoint tensors into ``model``'s parameters; every parameter must be filled. The
    family's adapter maps each checkpoint name onto the canonical ones (cutting fused tensors)."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    config: ModelConfig = model.config
    adapter = adapter_for(config.model_type)
    stacked = {
        name: (target, shard_id)
        for target, param in params.items()
        if hasattr(param, "checkpoint_tensors")
        for name, shard_id, _ in _stacked_tensors(target, param)
    }
    filled: set[str] = set()
    for checkpoint_name, loaded in _iterate_checkpoint(path, load_format, show_progress):
        if config.weights_prefix:
            if not checkpoint_name.startswith(config.weights_prefix):
                continue  # e.g. the vision tower of a multimodal checkpoint served as text
            checkpoint_name = checkpoint_name[len(config.weights_prefix) :]
        for name, rows in adapter.canonical_tensors(checkpoint_name, config):
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            target, shard_id = stacked.get(name) or _target_name(name, packed)
            param = params.get(target)
            if param is None:
                where = type(model).__name__
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no place in {where}")
            param.weight_loader(param, loaded if rows is None else RowView(loaded, rows), shard_id)
            filled.add(target if shard_id is None else f"{target}#{shard_id}")
    missing = [n for n in params if n not in filled and not any(f.startswith(n + "#") for f in filled)]
    missing += [name for name, (target, shard_id) in stacked.items() if f"{target}#{shard_id}" not in filled]
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights for: {', '.join(missing[:8])}")


class RowView:
    """The rows ``blocks`` of a checkpoint tensor (a tensor or a lazy safetensors slice) as one
    tensor, for weight loaders: indexing reads only the rows asked for (a rank's shard)."""

    def __init__(self, loaded: Any, blocks: RowBlocks):
        self.loaded = loaded
        self.blocks = blocks
        shape = tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)
        self.shape = (sum(stop - start for start, stop in blocks), *shape[1:])

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"RowView takes a slice of rows, got {index!r}")
        first, last, _ = rows.indices(self.shape[0])
        parts, offset = [], 0
        for start, stop in self.blocks:  # the part of each block that falls in [first, last)
            low, high = max(first, offset), min(last, offset + stop - start)
            if low < high:
                parts.append(self.loaded[(slice(start + low - offset, start + high - offset), *rest)])
            offset += stop - start
        if not parts:
            return torch.empty((0, *self.shape[1:]))[(slice(None), *rest)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stacked_tensors(target: str, param: nn.Parameter) -> Iterator[tuple[str, Any, tuple[int, ...]]]:
    """(checkpoint name, shard id, full shape) of the checkpoint tensors a stacked parameter
    (e.g. one tensor for all experts) gathers; the parameter lists them under its module."""
    module = target.rpartition(".")[0]
    for suffix, shard_id, shape in param.checkpoint_tensors():
        yield f"{module}.{suffix}", shard_id, shape


def _target_name(name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    for source, (fused, shard_id) in packed.items():
        marker = f".{source}."
        if marker in name:
            return name.replace(marker, f".{fused}."), shard_id
    return name, None


def _iterate_checkpoint(path: Path, load_format: str, show_progress: bool) -> Iterator[tuple[str, Any]]:
    gguf_file = gguf_file_in(path)
    if gguf_file is not None:
        yield from iterate_gguf_tensors(gguf_file)
        return
    files = _checkpoint_files(path, load_format)
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        for file in tqdm(files, desc="loading safetensors", disable=not show_progress or len(files) < 2):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, handle.get_slice(name)
    else:
        for file in tqdm(files, desc="loading .bin", disable=not show_progress or len(files) < 2):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


def _checkpoint_files(path: Path, load_format: str) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if load_format in ("auto", "safetensors"):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / shard for shard in shards]
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        if load_format == "safetensors":
            raise FileNotFoundError(f"no *.safetensors files in {path}")
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {path}")
    return files
