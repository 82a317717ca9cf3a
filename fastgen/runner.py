"""`ModelRunner`: runs step plans on one device (one tensor-parallel rank).

It keeps the per-sequence state a plan does not repeat (block table, sampling options, tokens
sampled so far), flattens each ragged batch into tensors, runs the model, computes logits only
where a chunk samples, and samples on the device.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen import kernels
from fastgen.batch import HostBatch
from fastgen.config import EngineConfig
from fastgen.cuda_graphs import DecodeGraphs
from fastgen.layers.attention import PagedAttention
from fastgen.layers.parallel import SINGLE, TensorParallel
from fastgen.models.config import ModelConfig
from fastgen.models.loader import build_model
from fastgen.piecewise_graphs import MixedGraphs
from fastgen.plan import SamplingOptions, SequenceChunk, StepPlan, StepResult

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_CPU_KV_CACHE_CAP_BYTES = 1 << 30


def mix_seed(seed: int, counter: int) -> int:
    """A 63-bit seed for draw number ``counter`` of a request seeded with ``seed`` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    if config.device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        ids = config.device_ids or list(range(config.tensor_parallel))
        return torch.device("cuda", ids[rank])
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        ids = config.device_ids or list(range(config.tensor_parallel))
        device = torch.device("cuda", ids[rank])
    return device


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class _SequenceState:
    sampling: SamplingOptions
    num_generated: int
    block_table: list[int] = field(default_factory=list)


def _plain_greedy(state: _SequenceState) -> bool:
    options = state.sampling
    return options.temperature == 0.0 and (
        state.num_generated >= options.min_new_tokens or not options.suppressed_token_ids
    )


class ModelRunner:
    """Executes `StepPlan`s for one rank. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        model_path: str | Path | None,
        config: EngineConfig,
        model_config: ModelConfig,
        max_model_len: int,
        *,
        tp: TensorParallel = SINGLE,
        show_progress: bool = True,
    ):
        self.config = config
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.tp = tp
        self.device = resolve_device(config, tp.rank)
        self.dtype = resolve_dtype(config, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = build_model(
            model_path,
            model_config,
            dtype=self.dtype,
            device=self.device,
            tp=tp,
            max_model_len=max_model_len,
            load_format=config.load_format,
            seed=config.seed,
            show_progress=show_progress and tp.rank == 0,
        )
        self.block_size = config.block_size
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.mixed_graphs: MixedGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            # before the KV cache is sized, so that the graphs' memory is accounted for
            self.mixed_graphs = MixedGraphs(self.model, device=self.device, max_tokens=config.token_budget)
            self.mixed_graphs.capture()
        # every rank must hold the same number of blocks: the engine keeps one block table for all
        self.num_kv_blocks, _ = tp.min_max_over_ranks(self._plan_kv_blocks())
        self._allocate_kv_cache(self.num_kv_blocks)
        self.sequences: dict[int, _SequenceState] = {}
        self._engine_random = random.Random(config.seed)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = DecodeGraphs(
                self.model,
                device=self.device,
                max_batch=min(config.max_seqs, config.token_budget, 512),
                max_model_len=max_model_len,
                block_size=self.block_size,
            )
            self.graphs.capture()

    # -- KV cache -------------------------------------------------------------------------

    @property
    def kv_bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        element = torch.empty((), dtype=self.dtype).element_size()
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * element
        return per_layer * len(self.attention_layers)

    def _plan_kv_blocks(self) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if config.kv_cache_bytes is not None:
            return max(1, config.kv_cache_bytes // self.kv_bytes_per_block)
        if self.device.type == "cuda":
            activation_bytes = self._profile_activation_bytes()
            free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
            budget = (
                total_bytes * config.gpu_memory_utilization - (total_bytes - free_bytes) - activation_bytes
            )
            blocks = int(budget // self.kv_bytes_per_block)
            if blocks < 1:
                raise MemoryError(
                    f"no GPU memory left for the KV cache: weights and activations use "
                    f"{(total_bytes - free_bytes + activation_bytes) / 2**30:.1f} GiB of "
                    f"{total_bytes / 2**30:.1f} GiB (gpu_memory_utilization={config.gpu_memory_utilization})"
                )
            return blocks
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        wanted = blocks_per_seq * config.max_seqs
        return max(1, min(wanted, _CPU_KV_CACHE_CAP_BYTES // self.kv_bytes_per_block))

    def _profile_activation_bytes(self) -> int:
        """Peak memory of a full-budget step (one long prompt chunk, then logits and sampling for
        the most rows a step can sample), measured with a throw-away cache."""
        config = self.config
        tokens = config.token_budget
        rows = min(config.max_seqs, tokens)
        blocks = -(-tokens // self.block_size) + 1
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._allocate_kv_cache(blocks)
        cache_bytes = torch.cuda.memory_allocated(self.device) - base
        host = HostBatch()
        host.add(SequenceChunk(0, [1] * tokens, 0, [], True), list(range(blocks)), self.block_size)
        token_ids, batch, _ = host.to_device(self.device)
        with torch.inference_mode():
            hidden = self.model(token_ids, batch)
            logits = self.model.compute_logits(hidden[:rows]).float()
            kernels.sample(
                logits,
                torch.ones(rows, device=self.device),
                torch.full((rows,), 50, dtype=torch.int32, device=self.device),
                torch.full((rows,), 0.9, device=self.device),
                torch.arange(rows, dtype=torch.int64, device=self.device),
            )
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - cache_bytes
        del hidden, logits, token_ids, batch
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # headroom for fragmentation and CUDA graphs

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        layer = self.attention_layers[0]
        shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        for module in self.attention_layers:
            module.key_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            module.value_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # -- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.released:
            self.sequences.pop(seq_id, None)
        for start in plan.started:
            self.sequences[start.seq_id] = _SequenceState(start.sampling, start.num_generated)
        if not plan.chunks:
            return StepResult(plan.step_id, [])
        started = time.perf_counter()
        host = HostBatch()
        sampled_states: list[_SequenceState] = []
        for chunk in plan.chunks:
            state = self.sequences[chunk.seq_id]
            state.block_table.extend(chunk.new_blocks)
            host.add(chunk, state.block_table, self.block_size)
            if chunk.sample:
                sampled_states.append(state)
        prepared = time.perf_counter()
        if self.graphs is not None and self.graphs.fits(host):
            logits = self.graphs.run(host)
        else:
            token_ids, batch, sample_indices = host.to_device(self.device)
            if self.mixed_graphs is not None and self.mixed_graphs.fits(host):
                hidden = self.mixed_graphs.run(host, batch)
            else:
                hidden = self.model(token_ids, batch)
            logits = self.model.compute_logits(hidden[sample_indices])
        tokens = self._sample(logits, sampled_states)
        for state in sampled_states:
            state.num_generated += 1
        finished = time.perf_counter()
        return StepResult(plan.step_id, tokens, prepared - started, finished - prepared)

    def _sample(self, logits: torch.Tensor, states: list[_SequenceState]) -> list[int]:
        if not states:
            return []
        if all(_plain_greedy(state) for state in states):
            return logits.argmax(dim=-1).tolist()
        logits = logits.float()
        temperature, top_k, top_p, seeds = [], [], [], []
        for row, state in enumerate(states):
            options = state.sampling
            if state.num_generated < options.min_new_tokens and options.suppressed_token_ids:
                logits[row, options.suppressed_token_ids] = float("-inf")
            temperature.append(options.temperature)
            top_k.append(options.top_k)
            top_p.append(options.top_p)
            if options.seed is not None:
                seeds.append(mix_seed(options.seed, state.num_generated))
            else:
                seeds.append(self._engine_random.getrandbits(63))
        device = logits.device
        tokens = kernels.sample(
            logits,
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.int32, device=device),
            torch.tensor(top_p, dtype=torch.float32, device=device),
            torch.tensor(seeds, dtype=torch.int64, device=device),
        )
        return tokens.tolist()
