"""Building a model and filling its weights: safetensors (single or sharded), ``*.bin``, or
random ("dummy") weights from the config alone. Each tensor-parallel rank reads only its slices."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fastgen.layers.parallel import TensorParallel

from . import model_class_for
from .config import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


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
) -> nn.Module:
    """Construct ``config``'s model on ``device`` in ``dtype`` and load (or draw) its weights."""
    cls = model_class_for(config)
    with _default_dtype(dtype), device:
        model = cls(config, tp, max_model_len)
    model.eval()
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        load_weights(model, Path(path), load_format, show_progress=show_progress)
    return model


def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights with the statistics of an initialized model (norms at 1), drawn on the
    model's device (a 7B model fills in well under a second on a GPU)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        param.data.normal_(0.0, 0.02, generator=generators[device])


def load_weights(
    model: nn.Module, path: Path, load_format: str = "auto", *, show_progress: bool = True
) -> None:
    """Copy checkpoint tensors into ``model``'s parameters; every parameter must be filled."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    filled: set[str] = set()
    for name, loaded in _iterate_checkpoint(path, load_format, show_progress):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = _target_name(name, packed)
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        param.weight_loader(param, loaded, shard_id)
        filled.add(target if shard_id is None else f"{target}#{shard_id}")
    missing = [n for n in params if n not in filled and not any(f.startswith(n + "#") for f in filled)]
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights for: {', '.join(missing[:8])}")


def _target_name(name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    for source, (fused, shard_id) in packed.items():
        marker = f".{source}."
        if marker in name:
            return name.replace(marker, f".{fused}."), shard_id
    return name, None


def _iterate_checkpoint(path: Path, load_format: str, show_progress: bool) -> Iterator[tuple[str, Any]]:
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
