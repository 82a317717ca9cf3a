"""GGUF checkpoints (llama.cpp's single-file format): the model config, the tokenizer and the
weights.

The metadata is mapped onto the Hugging Face ``config.json`` fields that `ModelConfig.from_dict`
reads, and the tensors onto HF names, dequantized to float32 one at a time (``gguf.quants``), so
the rest of the loader (tensor-parallel slicing included) treats a GGUF file like any other
checkpoint. llama.cpp's converter reorders the rows of the query and key projections of
Llama-architecture models (``permute`` in ``convert_hf_to_gguf.py``, for its interleaved rotary);
the reader undoes it, so the weights equal the HF checkpoint's.

`GGUFIndex` reads the file's header itself rather than through ``gguf.GGUFReader``: that reader
makes a numpy view of every element of every metadata array (each token of the vocabulary), which
takes seconds and ~150 MB for a 49k-token vocabulary, where the index skips the arrays nobody asks
for. No torch at import time: the engine process reads the config without loading a model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgen.errors import UnsupportedModelError

# GGUF ``general.architecture`` -> HF ``model_type``
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# these store the query and key rows permuted for llama.cpp's rotary (see the module docstring)
_PERMUTED_QK = ("llama", "mistral")
# tensor types dequantized at load (the ``gguf`` package implements them all in numpy)
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# ``<architecture>.<key>`` -> HF config field
_CONFIG_FIELDS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIPPED_TENSORS = ("rope_freqs.weight",)  # llama-3 rotary factors: read into rope_scaling instead
_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")

logger = logging.getLogger(__name__)


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file ``path`` names: ``path`` itself, or the only ``*.gguf`` of a directory without
    a ``config.json``; None when ``path`` is not a GGUF checkpoint. Raises `UnsupportedModelError`
    for a directory holding several, or for a file split in parts."""
    if path.is_file():
        file = path if path.suffix.lower() == ".gguf" or is_gguf_file(path) else None
    elif path.is_dir() and not (path / "config.json").is_file():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(files) > 1:
            names = ", ".join(p.name for p in files[:6])
            raise UnsupportedModelError(
                f"{path} holds several GGUF files ({names}): name the one to load, e.g. {files[0]}"
            )
        file = files[0] if files else None
    else:
        file = None
    if file is not None and _SPLIT_FILE.search(file.name):
        raise UnsupportedModelError(
            f"{file} is one part of a split GGUF checkpoint, which fastgen does not read; merge the parts "
            "into one file first (llama.cpp: llama-gguf-split --merge FIRST_PART OUT.gguf)"
        )
    return file


def read_config(file: Path) -> dict[str, Any]:
    """The HF-style config dict of a GGUF file (what `ModelConfig.from_dict` reads). Raises
    `UnsupportedModelError` naming the architecture or tensor types fastgen cannot load."""
    index = GGUFIndex(file)
    tensors = index.tensors
    rope_freqs = tensors.get("rope_freqs.weight")
    rope_factors = None if rope_freqs is None else index.values(rope_freqs).reshape(-1).tolist()
    metadata = dict(index.metadata)
    if "token_embd.weight" in tensors:
        metadata["embedding_rows"] = tensors["token_embd.weight"].shape[0]
    return _config_dict(file, metadata, {t.name: t.type_name for t in tensors.values()}, rope_factors)


def iterate_tensors(file: Path) -> Iterator[tuple[str, Any]]:
    """(HF name, float32 torch tensor) of every weight of ``file``, dequantized one at a time."""
    import torch

    config = read_config(file)
    permuted = config["gguf_architecture"] in _PERMUTED_QK
    index = GGUFIndex(file)
    for tensor in index.tensors.values():
        if tensor.name in _SKIPPED_TENSORS:
            continue
        name = hf_tensor_name(tensor.name)
        values = index.values(tensor)
        if permuted and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
            values = unpermute_rotary_rows(values, heads)
        yield name, torch.from_numpy(values)


def hf_tensor_name(name: str) -> str:
    """The HF name of GGUF tensor ``name``: ``blk.3.attn_q.weight`` is
    ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, kind = name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.{kind}"
    raise UnsupportedModelError(f"GGUF tensor {name!r} has no counterpart in fastgen's Llama-family models")


def _has_hf_name(name: str) -> bool:
    try:
        hf_tensor_name(name)
    except UnsupportedModelError:
        return False
    return True


def unpermute_rotary_rows(values: Any, num_heads: int) -> Any:
    """Undo llama.cpp's reordering of a query or key projection's rows (or bias): within each head,
    the converter interleaves the two rotary halves (rows ``i`` and ``i + head_dim/2`` become
    neighbours); put them back in HF's half-split order."""
    rows = values.shape[0]
    half = rows // num_heads // 2
    return values.reshape(num_heads, half, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def load_tokenizer(file: Path) -> Any:
    """The HF tokenizer (with its chat template) that transformers builds from the GGUF metadata.

    Building it takes seconds (transformers parses every token and merge of the file), reading it
    back from a saved copy well under one, so the first build of each file (path, size, modification
    time) under each transformers version is saved in `tokenizer_cache_dir`; a cache that cannot be
    written is skipped."""
    import transformers
    from transformers import AutoTokenizer

    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    cached = tokenizer_cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".building-"))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(cached)  # atomic: a reader never sees half a copy
        except OSError:  # another process saved it first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        logger.info("not caching the tokenizer of %s: %s", file, exc)
    return tokenizer


def tokenizer_cache_dir() -> Path:
    """``$FASTGEN_CACHE_DIR/gguf-tokenizers``, by default under ``$XDG_CACHE_HOME/fastgen`` or
    ``~/.cache/fastgen``."""
    base = os.environ.get("FASTGEN_CACHE_DIR")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastgen")
    return Path(base) / "gguf-tokenizers"


# -- metadata --------------------------------------------------------------------------------------


# GGUF metadata value types -> struct format (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # HF order (slowest dimension first); GGUF lists them fastest first
    type_id: int  # ggml type (``gguf.GGMLQuantizationType``)
    offset: int  # of its data, from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"


class GGUFIndex:
    """A GGUF file's metadata and tensor table, with the tensors' data mapped from the file.
    Metadata arrays of strings (the vocabulary) are skipped unless named in ``string_arrays``."""

    def __init__(self, path: Path, string_arrays: tuple[str, ...] = ()):
        self.path = path
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        magic, version = self._read("<4sI")
        if magic != b"GGUF":
            raise UnsupportedModelError(f"{path} is not a GGUF file (it lacks the GGUF magic bytes)")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = self._read("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            (kind,) = self._read("<I")
            self.metadata[key] = self._value(kind, keep_strings=key in string_arrays)
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            (num_dims,) = self._read("<I")
            dims = self._read(f"<{num_dims}Q")
            type_id, offset = self._read("<IQ")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {
            name: TensorInfo(name, shape, type_id, data_start + offset, _nbytes(shape, type_id))
            for name, shape, type_id, offset in infos
        }

    def values(self, tensor: TensorInfo) -> Any:
        """The tensor as a writable float32 numpy array of its HF shape."""
        import numpy as np
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)
        rows = raw.reshape(*tensor.shape[:-1], -1)  # quantized blocks run along the last dimension
        values = dequantize(rows, GGMLQuantizationType(tensor.type_id))
        # F32 data is a view of the read-only map: copied; dequantized data is fresh: kept
        return np.require(values, np.float32, ["C", "W"]).reshape(tensor.shape)

    def _read(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._read("<Q")
        text = self._map[self._pos : self._pos + length].decode("utf-8", "replace")
        self._pos += length
        return text

    def _value(self, kind: int, keep_strings: bool = False) -> Any:
        if kind in _SCALARS:
            return self._read("<" + _SCALARS[kind])[0]
        if kind == 8:
            return self._string()
        if kind != 9:
            raise UnsupportedModelError(f"{self.path}: unknown GGUF metadata type {kind}")
        item_kind, count = self._read("<IQ")
        if item_kind in _SCALARS:
            return list(self._read(f"<{count}{_SCALARS[item_kind]}"))
        if item_kind == 8 and not keep_strings:
            for _ in range(count):  # skip: each string is its length, then its bytes
                self._pos += 8 + struct.unpack_from("<Q", self._map, self._pos)[0]
            return None
        return [self._value(item_kind, keep_strings) for _ in range(count)]


def _nbytes(shape: tuple[int, ...], type_id: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return 0  # an unknown type: refused by name when the config is read
    return math.prod(shape) // block_size * type_size


def _config_dict(
    path: Path, fields: dict[str, Any], tensor_types: dict[str, str], rope_factors: list[float] | None
) -> dict[str, Any]:
    architecture = fields.get("general.architecture")
    if architecture not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {architecture!r} is not supported; fastgen loads GGUF files of "
            f"the architectures {supported} (other models: use their Hugging Face checkpoint)"
        )
    unsupported = sorted({kind for kind in tensor_types.values() if kind not in SUPPORTED_TYPES})
    if unsupported:
        raise UnsupportedModelError(
            f"{path}: GGUF tensor type(s) {', '.join(unsupported)} are not supported; fastgen dequantizes "
            f"{', '.join(SUPPORTED_TYPES)} (use a file quantized to one of them, e.g. Q8_0 or Q4_K_M)"
        )
    if any("_exps." in name for name in tensor_types):
        raise UnsupportedModelError(
            f"{path}: mixture-of-experts GGUF files are not supported; use the Hugging Face checkpoint"
        )
    unknown = [name for name in tensor_types if name not in _SKIPPED_TENSORS and not _has_hf_name(name)]
    if unknown:
        raise UnsupportedModelError(
            f"{path}: GGUF tensors {', '.join(unknown[:4])} have no place in fastgen's {architecture} model"
        )
    prefix = architecture + "."
    arch = {key[len(prefix) :]: value for key, value in fields.items() if key.startswith(prefix)}
    config: dict[str, Any] = {"model_type": ARCHITECTURES[architecture], "gguf_architecture": architecture}
    for key, field in _CONFIG_FIELDS.items():
        if key in arch:
            config[field] = arch[key]
    kv_heads = config.get("num_key_value_heads")
    if isinstance(kv_heads, list):  # one entry per layer in some files
        if len(set(kv_heads)) != 1:
            raise UnsupportedModelError(f"{path}: layers with different numbers of KV heads are unsupported")
        config["num_key_value_heads"] = kv_heads[0]
    if "vocab_size" not in config:
        config["vocab_size"] = fields["embedding_rows"]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.setdefault("head_dim", hidden // heads)
    rotary_dim = arch.get("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        config["partial_rotary_factor"] = rotary_dim / head_dim
    if config.get("sliding_window") and config["model_type"] == "llama":
        config["model_type"] = "mistral"  # Mistral is Llama with a sliding window
    scaling = _rope_scaling(arch, rope_factors, config, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config["tie_word_embeddings"] = "output.weight" not in tensor_types
    config["attention_bias"] = config["model_type"] != "qwen2" and "blk.0.attn_q.bias" in tensor_types
    config["bos_token_id"] = fields.get("tokenizer.ggml.bos_token_id")
    # llama.cpp stops at any end-of-generation token: end of sequence, of turn, of message
    eos = [fields.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    config["eos_token_id"] = list(dict.fromkeys(token for token in eos if token is not None))
    file_type = fields.get("general.file_type")
    config["torch_dtype"] = {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type)
    return config


def _rope_scaling(
    arch: dict[str, Any], rope_factors: list[float] | None, config: dict[str, Any], path: Path
) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``rope.scaling.*`` (linear), or from the per-frequency factors
    llama.cpp stores for Llama 3.1+ (``rope_freqs.weight``): those are matched against the llama3
    rule with the published settings, since the file does not keep the settings themselves."""
    kind = arch.get("rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(arch["rope.scaling.factor"])}
    if kind not in (None, "none"):
        raise UnsupportedModelError(f"{path}: GGUF rope scaling {kind!r} is not supported")
    if rope_factors is None:
        return None
    rotary_dim = int(config["head_dim"] * config.get("partial_rotary_factor", 1.0))
    theta = float(config.get("rope_theta", 10000.0))
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for original in (8192, 4096, 16384):
            settings = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": original,
            }
            expected = _llama3_divisors(rotary_dim, theta, settings)
            if len(expected) == len(rope_factors) and all(
                math.isclose(a, b, rel_tol=1e-3) for a, b in zip(expected, rope_factors)
            ):
                return settings
    raise UnsupportedModelError(
        f"{path}: the file's rotary frequency factors (rope_freqs.weight) match no Llama 3 setting fastgen "
        "knows; use the Hugging Face checkpoint"
    )


def _llama3_divisors(rotary_dim: int, theta: float, settings: dict[str, Any]) -> list[float]:
    """What llama.cpp divides each rotary frequency by under the llama3 rule (its rope_freqs)."""
    factor = settings["factor"]
    low, high = settings["low_freq_factor"], settings["high_freq_factor"]
    original = settings["original_max_position_embeddings"]
    divisors = []
    for i in range(0, rotary_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / rotary_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return divisors
