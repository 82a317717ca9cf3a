"""`EngineConfig`: the one configuration object of an engine."""

from __future__ import annotations

from typing import Any

import msgspec

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
_EXECUTORS = ("auto", "inprocess", "zmq")
_QUANTIZATIONS = (None, "fp8")
_KV_CACHE_DTYPES = ("auto", "fp8")


# `pipeline()`'s token budget unless it is given: a batch call waits for all of its outputs, so
# the gap between two tokens of a request costs it nothing, and fuller steps finish the batch
# sooner (README, "Latency or throughput"). The serving APIs keep `EngineConfig.token_budget`.
OFFLINE_TOKEN_BUDGET = 2048


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How an engine runs. Every field has a default that works; each field's documentation is the
    string below it, which is also its help in the ``fastgen`` command (see `field_docs`)."""

    tensor_parallel: int = 1
    """GPUs (worker processes) the model is split across."""
    token_budget: int = 768
    """Tokens per forward pass: the Dynamic SplitFuse budget (MII's ``max_ragged_batch_size``)."""
    max_seqs: int = 512
    """Sequences alive at once (MII's ``max_ragged_sequence_count``)."""
    block_size: int = 16
    """Tokens per KV-cache block (a power of two)."""
    num_kv_blocks: int | None = None
    """KV-cache blocks. When neither this nor ``kv_cache_bytes`` is set: the GPU's free memory times
    ``gpu_memory_utilization`` after weights and activations, or on CPU enough for ``max_seqs``
    sequences of ``max_model_len`` capped at 1 GiB."""
    kv_cache_bytes: int | None = None
    """KV-cache size in bytes (instead of ``num_kv_blocks``)."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory the engine may use (weights, activations and the KV cache)."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's context length."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on GPU, float16 where bf16 is missing, float32 on CPU), ``float32``,
    ``float16`` or ``bfloat16``."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    device_ids: list[int] | None = None
    """The GPUs a tensor-parallel engine uses (default ``0..tensor_parallel-1``)."""
    load_format: str = "auto"
    """``auto``, ``safetensors``, ``pt`` or ``dummy`` (random weights from the config alone)."""
    tokenizer: str | None = None
    """A tokenizer (directory or hub name) to use instead of the model's own."""
    executor: str = "auto"
    """``inprocess`` runs the model in the engine's process (in a worker thread); ``zmq`` runs it in
    worker processes; ``auto`` is in-process unless ``tensor_parallel > 1``."""
    max_queued_requests: int = 4096
    """Bound of the waiting queue; beyond it requests are refused with `EngineOverloadedError`."""
    cuda_graphs: bool = True
    """Replay CUDA graphs for decode-only steps and piecewise graphs for steps with prompt chunks."""
    async_scheduling: bool = True
    """Plan step N+1 while step N runs, before its tokens reach the host (the workers fill them in),
    so the device does not wait for the engine between steps. A sequence that stops at N computes
    one more token, which is dropped; outputs are the same."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes computed before (shared system prompts, multi-turn
    chats); unused cached blocks are evicted when space is needed."""
    quantization: str | None = None
    """``fp8`` stores the linear layers' weights in float8 e4m3 with a scale per output feature
    (half the weight memory and decode traffic): decode batches of up to 8 rows read them in a
    Triton GEMV (W8A16), larger ones run W8A8 with per-token activation scales on H100/H200 tensor
    cores; unset keeps the model dtype."""
    kv_cache_dtype: str = "auto"
    """``auto`` keeps keys and values in the model dtype; ``fp8`` stores them in float8 e4m3 (values
    saturate at +-448, no scale): half the KV memory, so twice the tokens, and half the KV reads of
    decode attention, for a small loss of precision."""
    seed: int = 0
    """Seed of the engine's own random stream (for requests without a seed)."""
    cpu_threads: int | None = None
    """Torch threads of a model on the CPU (per tensor-parallel rank). Unset: ``OMP_NUM_THREADS``
    when set, else one less than the cores this process may use (the engine's own thread needs one),
    split between ranks and between a deployment's replicas; at least 1. Ignored on GPUs. Torch's
    count is per process: threads of the host application that start later get it too."""
    freeze_gc: bool = True
    """Once started, move every Python object alive (the model's, the libraries', the host's) out
    of the cyclic garbage collector's scans (`gc.freeze`) until the engine stops, so a full
    collection while serving does not pause every running request for the time it takes to scan
    them; worker processes freeze theirs for good. Objects allocated later are collected as usual."""
    worker_start_timeout_s: float = 300.0
    """How long the worker processes (``zmq`` executor) may take to load the model and report ready."""
    step_timeout_s: float | None = 600.0
    """How long the worker processes (``zmq`` executor) may take to answer one step before the engine
    declares them hung, kills them and stops (unset: wait forever). Generous by default: a first
    step may compile kernels for minutes."""

    def __post_init__(self) -> None:
        _positive(self, "tensor_parallel", "token_budget", "max_seqs", "block_size", "max_queued_requests")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.step_timeout_s is not None and not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be positive or None, got {self.step_timeout_s}")
        _one_of(self.dtype, "dtype", _DTYPES)
        _one_of(self.load_format, "load_format", _LOAD_FORMATS)
        _one_of(self.executor, "executor", _EXECUTORS)
        _one_of(self.quantization, "quantization", _QUANTIZATIONS)
        _one_of(self.kv_cache_dtype, "kv_cache_dtype", _KV_CACHE_DTYPES)
        if self.device_ids is not None and len(self.device_ids) != self.tensor_parallel:
            raise ValueError(
                f"device_ids names {len(self.device_ids)} devices but tensor_parallel={self.tensor_parallel}"
            )

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from keyword options (unknown names raise a ValueError listing the known ones)."""
        known = set(cls.__struct_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def replace(self, **changes: Any) -> EngineConfig:
        return msgspec.structs.replace(self, **changes)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string literal below it in ``cls``'s body, as one line."""
    import ast
    import inspect
    import itertools
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _positive(config: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _one_of(value: str | None, name: str, allowed: tuple[str | None, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
