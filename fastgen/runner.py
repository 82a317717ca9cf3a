"""`ModelRunner`: runs step plans on one device (one tensor-parallel rank).

It keeps the per-sequence state a plan does not repeat (block table, sampling options, tokens
sampled so far), flattens each ragged batch into tensors, runs the model, computes logits only
where a chunk samples, and samples on the device. For the sequences that ask, it also computes raw
log-probabilities there (see `_sample`), and applies penalties and logit biases (`fastgen.penalties`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from fastgen import kernels
from fastgen.batch import HostBatch
from fastgen.config import EngineConfig
from fastgen.cuda_graphs import DecodeGraphs
from fastgen.kernel_warmup import warm_up_attention, warm_up_steps
from fastgen.kernels.attention import CpuAttentionWorkspace
from fastgen.kernels.variants import CompileWatch
from fastgen.layers.attention import PagedAttention
from fastgen.layers.parallel import SINGLE, TensorParallel
from fastgen.models.config import ModelConfig
from fastgen.models.loader import build_model
from fastgen.penalties import PenaltyTable, PenaltyTracker, worst_case_trackers
from fastgen.piecewise_graphs import MixedGraphs
from fastgen.plan import (
    PENDING_TOKEN,
    SampleLogprobs,
    SamplingOptions,
    SequenceChunk,
    StepPlan,
    StepResult,
)
from fastgen.sampling_params import MAX_LOGPROBS

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


def cpu_threads(config: EngineConfig, tp_size: int = 1, engines: int = 1) -> int:
    """Torch threads of a rank on the CPU: ``config.cpu_threads``, else ``OMP_NUM_THREADS``, else
    the cores this process may use less one per engine, split between the ranks of the ``engines``
    that share them (a deployment's replicas on one host); at least 1.

    The core left over is the engine's: its event loop schedules, detokenizes and serves while a
    step runs. Without it, a step's torch threads and the engine's thread take turns on the cores,
    and every parallel op waits for its slowest thread: on a loaded machine, decoding with all cores
    is slower than with one fewer (benchmarks/results/cpu_generate-2026-12-06.md)."""
    if config.cpu_threads is not None:
        return config.cpu_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - engines) // (tp_size * engines))


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
    penalties: PenaltyTracker | None = None  # for a sequence with penalties or logit biases
    last_sampled: int = 0  # what a `PENDING_TOKEN` of the next step stands for


@dataclass
class LaunchedStep:
    """A step whose device work is queued (`ModelRunner.launch`), until `ModelRunner.collect`."""

    step_id: int
    began_s: float
    samples: _PendingSample | None = None  # None: the step sampled nothing
    prompt_samples: _PendingSample | None = None
    sampled_states: list[_SequenceState] = field(default_factory=list)
    prepared_s: float = 0.0
    compiles: int = 0
    tokens: torch.Tensor | None = None  # the sampled ids on the device, row by row
    rows: dict[int, int] = field(default_factory=dict)  # seq_id -> its row in ``tokens``
    collected: threading.Event = field(default_factory=threading.Event)
    device_timer: _DeviceTimer | None = None


class _DeviceTimer:
    """The span of one step's device work on its stream, between two timing events."""

    def __init__(self) -> None:
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.begin.record()

    def stop(self) -> None:
        self.end.record()

    def microseconds(self) -> int:
        self.end.synchronize()
        return round(self.begin.elapsed_time(self.end) * 1e3)


class _TokenFeed:
    """Puts the previous step's sampled ids, still on the device, into this step's token ids:
    ``feed`` pairs (token index, row of ``source``)."""

    def __init__(self, feed: list[tuple[int, int]], source: torch.Tensor | None):
        assert source is not None  # rows come from a step that sampled
        self.feed, self.source = feed, source

    def __call__(self, token_ids: torch.Tensor) -> None:
        count = len(self.feed)
        if all(index == row == i for i, (index, row) in enumerate(self.feed)):
            token_ids[:count].copy_(self.source[:count])  # decodes in the same order: one copy
            return
        pairs = torch.tensor(self.feed, dtype=torch.int64).to(token_ids.device, non_blocking=True)
        token_ids.index_copy_(0, pairs[:, 0], self.source.index_select(0, pairs[:, 1]))


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
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        # the CPU attention's gather tensors, kept from step to step (their pages fault in once)
        self.cpu_attention_workspace = CpuAttentionWorkspace()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.device.type == "cpu":
            # from the thread that runs the steps: with OpenMP, a thread keeps the count it first saw
            # (a later torch.set_num_threads elsewhere does not reach it)
            torch.set_num_threads(cpu_threads(config, tp.size))
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
            quantization=config.quantization,
        )
        self.block_size = config.block_size
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.mixed_graphs: MixedGraphs | None = None
        capturable = getattr(self.model, "supports_cuda_graphs", True)
        use_graphs = self.device.type == "cuda" and config.cuda_graphs and capturable
        if use_graphs:
            # before the KV cache is sized, so that the graphs' memory is accounted for
            self.mixed_graphs = MixedGraphs(self.model, device=self.device, max_tokens=config.token_budget)
            self.mixed_graphs.capture()
        # every rank must hold the same number of blocks: the engine keeps one block table for all
        self.num_kv_blocks, _ = tp.min_max_over_ranks(self._plan_kv_blocks())
        self._allocate_kv_cache(self.num_kv_blocks)
        self.sequences: dict[int, _SequenceState] = {}
        self._previous = LaunchedStep(-1, 0.0)  # the step launched last
        self._previous.collected.set()
        self.penalties = PenaltyTable(min(config.max_seqs, config.token_budget), self.device)
        self._engine_random = random.Random(config.seed)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(
                self.model,
                device=self.device,
                max_batch=min(config.max_seqs, config.token_budget, 512),
                max_model_len=max_model_len,
                block_size=self.block_size,
            )
            self.graphs.capture()
        self.compile_watch: CompileWatch | None = None
        if self.device.type == "cuda" and not kernels.reference_forced():
            warm_up_attention(self.attention_layers, self.dtype)
            warm_up_steps(self.execute, self.block_size)
            self.compile_watch = CompileWatch()  # from here on, a compile is a stall: reported

    # -- KV cache -------------------------------------------------------------------------

    @property
    def kv_bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        element = torch.empty((), dtype=self.kv_dtype).element_size()
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
        """Peak memory of a full-budget step (one long prompt chunk, then logits, log-probabilities,
        penalties and sampling for the most rows a step can sample), measured with a throw-away
        cache."""
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
            # prompt log-probabilities take the log-softmax of up to every token of a step
            torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
            logits = self.model.compute_logits(hidden[:rows]).float()
            raw = torch.log_softmax(logits, dim=-1)  # alive while the step samples, as in `_sample`
            raw.topk(min(MAX_LOGPROBS, logits.shape[-1]), dim=-1)
            table = PenaltyTable(rows, self.device)
            trackers = worst_case_trackers(table, rows)
            adjusted = table.apply(logits.clone(), list(range(rows)), trackers, [1] * rows)
            kernels.sample(
                adjusted,
                torch.ones(rows, device=self.device),
                torch.full((rows,), 50, dtype=torch.int32, device=self.device),
                torch.full((rows,), 0.9, device=self.device),
                torch.arange(rows, dtype=torch.int64, device=self.device),
            )
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - cache_bytes
        del hidden, logits, raw, table, trackers, adjusted, token_ids, batch
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # headroom for fragmentation and CUDA graphs

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        layer = self.attention_layers[0]
        shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        for module in self.attention_layers:
            module.key_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            module.value_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    # -- one step --------------------------------------------------------------------------

    def execute(self, plan: StepPlan, on_launched: Callable[[], None] | None = None) -> StepResult:
        """Run one step: `launch` it, then `collect` its result."""
        return self.collect(self.launch(plan, on_launched))

    @torch.inference_mode()
    def launch(self, plan: StepPlan, on_launched: Callable[[], None] | None = None) -> LaunchedStep:
        """Queue one step's device work and the copy of its sampled ids to the host; `collect`
        waits for them. The next step may be launched before this one is collected: a token this
        step samples and the next one reads (``PENDING_TOKEN``) goes from this step's output to
        the next one's input on the device. ``on_launched`` is called once the device work is
        queued (the in-process executor lets the engine continue from there, so its host work
        does not hold the GIL while this thread launches)."""
        for seq_id in plan.released:
            released = self.sequences.pop(seq_id, None)
            if released is not None and released.penalties is not None:
                self.penalties.release(released.penalties)
        for start in plan.started:
            state = _SequenceState(start.sampling, start.num_generated)
            if start.sampling.adjusts_logits:
                state.penalties = self.penalties.track(start.sampling)
            self.sequences[start.seq_id] = state
        previous, launched = self._previous, LaunchedStep(plan.step_id, time.perf_counter())
        if not plan.chunks:
            return launched
        host = HostBatch()
        feed: list[tuple[int, int]] = []  # (token index, row of the previous step's samples)
        sampled_states: list[_SequenceState] = []
        for chunk in plan.chunks:
            state = self.sequences[chunk.seq_id]
            if chunk.token_ids[0] == PENDING_TOKEN:
                # the token sampled in the step before (if that step failed, the sequence was
                # failed too and this step's output for it is dropped)
                row = previous.rows.get(chunk.seq_id) if state.penalties is None else None
                if row is not None:
                    feed.append((host.num_tokens, row))
                else:  # the token is needed on the host (penalties count it): once its step is back
                    previous.collected.wait()
                chunk = msgspec.structs.replace(chunk, token_ids=[state.last_sampled])
            state.block_table.extend(chunk.new_blocks)
            host.add(chunk, state.block_table, self.block_size)
            if state.penalties is not None:
                state.penalties.observe(chunk)
            if chunk.sample:
                sampled_states.append(state)
        prepared = time.perf_counter()
        timer = _DeviceTimer() if self.device.type == "cuda" else None
        fed = _TokenFeed(feed, previous.tokens) if feed else None
        scored = [(offset, chunk) for offset, chunk in _chunk_offsets(plan.chunks) if chunk.prompt_targets]
        prompt_pending = None
        if self.graphs is not None and not scored and self.graphs.fits(host):
            logits = self.graphs.run(host, before_replay=fed)
        else:
            token_ids, batch, sample_indices = host.to_device(self.device, self.cpu_attention_workspace)
            if fed is not None:
                fed(token_ids)
            if self.mixed_graphs is not None and self.mixed_graphs.fits(host.num_tokens):
                hidden = self.mixed_graphs.run(token_ids, batch)
            else:
                hidden = self.model(token_ids, batch)
            if scored:
                prompt_pending = self._score_prompts(hidden, scored)
            logits = self.model.compute_logits(hidden[sample_indices])
        pending = self._sample(logits, sampled_states)
        for state in sampled_states:  # after sampling, which draws by the count so far
            state.num_generated += 1
        launched.samples = pending.copy_to_host()
        launched.prompt_samples = None if prompt_pending is None else prompt_pending.copy_to_host()
        if timer is not None:
            timer.stop()
        launched.device_timer = timer
        launched.sampled_states, launched.prepared_s = sampled_states, prepared
        if pending.tokens is not None:
            launched.tokens = pending.tokens
            sampling = [chunk.seq_id for chunk in plan.chunks if chunk.sample]
            launched.rows = {seq_id: row for row, seq_id in enumerate(sampling)}
        if on_launched is not None:
            on_launched()
        # every launch is issued (a compile happens at launch): counted while the device works
        launched.compiles = self._count_compiles(plan.step_id)
        self._previous = launched  # last: a launch that raised is never collected, nor waited for
        return launched

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step's sampled ids (and log-probabilities) and return its result.
        Steps are collected in the order they were launched."""
        try:
            if launched.samples is None:
                return StepResult(launched.step_id, [])
            tokens, logprobs = launched.samples.to_host()
            for state, token in zip(launched.sampled_states, tokens):
                state.last_sampled = token
            prompt = launched.prompt_samples
            prompt_logprobs = None if prompt is None else prompt.to_host()[1]
            return StepResult(
                launched.step_id,
                tokens,
                launched.prepared_s - launched.began_s,
                time.perf_counter() - launched.prepared_s,
                logprobs,
                prompt_logprobs,
                launched.compiles,
                0 if launched.device_timer is None else launched.device_timer.microseconds(),
            )
        finally:
            launched.collected.set()

    def _count_compiles(self, step_id: int) -> int:
        """Kernel variants this step compiled (each stalled it), logged with their names."""
        if self.compile_watch is None:
            return 0
        compiled = self.compile_watch.new_compiles()
        if compiled:
            logger.warning("step %d compiled Triton kernel variants while serving: %s", step_id, compiled)
        return sum(compiled.values())

    def _score_prompts(
        self, hidden: torch.Tensor, scored: list[tuple[int, SequenceChunk]]
    ) -> _PendingSample | None:
        """Raw log-probabilities of each chunk's prompt targets (the next prompt token at each of its
        first positions) and the top N there, as for sampled tokens (`_sample`); all ranks compute
        the logits (the LM head gathers across ranks), rank 0 the rest."""
        rows = torch.cat([
            torch.arange(offset, offset + len(chunk.prompt_targets)) for offset, chunk in scored
        ]).to(hidden.device)
        logits = self.model.compute_logits(hidden[rows])
        if self.tp.rank != 0:
            return None
        raw = torch.log_softmax(logits.float(), dim=-1)
        targets = [token for _, chunk in scored for token in chunk.prompt_targets]
        picked = torch.tensor(targets, dtype=torch.int64, device=raw.device)
        wanted = [self.sequences[chunk.seq_id].sampling.prompt_logprobs for _, chunk in scored]
        per_row = [n for n, (_, chunk) in zip(wanted, scored) for _ in chunk.prompt_targets]
        pending = _pack_logprobs(picked, raw, picked, list(range(len(targets))), per_row)
        sizes = [len(chunk.prompt_targets) for _, chunk in scored]

        def unpack(packed: list[float]) -> tuple[list[int], list[list[SampleLogprobs]]]:
            _, rows_out = pending.unpack(packed)
            grouped, start = [], 0
            for size in sizes:
                grouped.append(rows_out[start : start + size])
                start += size
            return [], grouped

        return _PendingSample(pending.values, unpack)

    def _sample(self, logits: torch.Tensor, states: list[_SequenceState]) -> _PendingSample:
        """One token per row, and for the rows whose sequence asks, raw log-probabilities: the
        log-softmax in float32 over the whole vocabulary of the logits as the model produced them
        (before temperature, top-k, top-p and ``min_new_tokens`` suppression, like vLLM's default),
        evaluated at the sampled token and at the top N. Under tensor parallelism the LM head
        gathers the vocabulary slices, so every rank holds whole rows; only rank 0, whose result
        the engine reads, computes them. Everything comes back in one device-to-host copy.

        Penalties and logit biases change the logits of the rows that ask after the raw
        log-probabilities are taken and before anything else (greedy rows take the argmax of the
        changed logits). Every rank applies them: each keeps the same trackers, fed by the same
        chunks, so the ranks sample alike."""
        if not states:
            return _PendingSample(None)
        asking = [row for row, state in enumerate(states) if state.sampling.logprobs is not None]
        if self.tp.rank != 0:
            asking = []  # the engine reads rank 0's result alone
        greedy = all(_plain_greedy(state) for state in states)
        penalized = []
        if self.penalties.num_tracked:
            penalized = [row for row, state in enumerate(states) if state.penalties is not None]
        if greedy and not asking and not penalized:
            tokens = kernels.greedy_argmax(logits)
            return _PendingSample(tokens, tokens=tokens)
        raw = index = None
        if asking:  # before sampling may change the logits
            if len(asking) < len(states):
                index = torch.tensor(asking, dtype=torch.int64, device=logits.device)
            raw = torch.log_softmax((logits if index is None else logits[index]).float(), dim=-1)
        if penalized:
            trackers = [states[row].penalties for row in penalized]
            generated = [states[row].num_generated for row in penalized]
            logits = self.penalties.apply(logits, penalized, trackers, generated)
        tokens = logits.argmax(dim=-1) if greedy else self._sample_tokens(logits, states)
        if raw is None:
            return _PendingSample(tokens, tokens=tokens)
        picked = tokens if index is None else tokens[index]
        wanted = [states[row].sampling.logprobs for row in asking]
        return _pack_logprobs(tokens, raw, picked, asking, wanted)

    def _sample_tokens(self, logits: torch.Tensor, states: list[_SequenceState]) -> torch.Tensor:
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
        _drop_below_min_p(logits, states)
        return kernels.sample(
            logits,
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.int32, device=device),
            torch.tensor(top_p, dtype=torch.float32, device=device),
            torch.tensor(seeds, dtype=torch.int64, device=device),
        )


def _drop_below_min_p(logits: torch.Tensor, states: list[_SequenceState]) -> None:
    """In place, for the sampled rows that set ``min_p``: -inf where the probability (after
    temperature) is below ``min_p`` times the row's largest, i.e. where
    ``logit < max logit + temperature * log(min_p)``."""
    rows = [r for r, s in enumerate(states) if s.sampling.min_p > 0.0 and s.sampling.temperature > 0.0]
    if not rows:
        return
    margins = [states[r].sampling.temperature * math.log(states[r].sampling.min_p) for r in rows]
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    chosen = logits[index]
    floor = chosen.max(dim=-1, keepdim=True).values + torch.tensor(margins, device=logits.device)[:, None]
    logits[index] = chosen.masked_fill(chosen < floor, float("-inf"))


class _PendingSample:
    """Sampled ids (and logprobs) queued on the device: `copy_to_host` queues their copy to the
    host, `to_host` waits for it. ``tokens``: the sampled ids themselves, on the device."""

    def __init__(
        self,
        values: torch.Tensor | None,
        unpack: Callable[[list], tuple] | None = None,
        tokens: torch.Tensor | None = None,
    ):
        self.values = values
        self.unpack = unpack
        self.tokens = tokens
        self.copied: torch.cuda.Event | None = None

    def copy_to_host(self) -> _PendingSample:
        values = self.values
        if values is not None and values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
            self.values = host
        return self

    def to_host(self) -> tuple[list[int], list[SampleLogprobs | None] | None]:
        if self.values is None:
            return [], None
        if self.copied is not None:
            self.copied.synchronize()  # without the GIL
        values = self.values.tolist()
        return self.unpack(values) if self.unpack is not None else (values, None)


def _chunk_offsets(chunks: list[SequenceChunk]) -> list[tuple[int, SequenceChunk]]:
    """Each chunk with the index of its first token in the step's flattened batch."""
    offsets, total = [], 0
    for chunk in chunks:
        offsets.append((total, chunk))
        total += len(chunk.token_ids)
    return offsets


def _pack_logprobs(
    tokens: torch.Tensor, raw: torch.Tensor, picked: torch.Tensor, rows: list[int], wanted: list[int]
) -> _PendingSample:
    """The sampled ids ``tokens`` and, for each of ``rows`` (whose log-softmax is ``raw[i]`` and
    sampled token ``picked[i]``), that token's log-probability and the top ``wanted[i]``; gathered
    on the device and packed into one float64 vector (exact for token ids and float32 values), so
    that one copy brings everything to the host."""
    num_rows, num_asking = tokens.shape[0], len(rows)
    top_n = min(max(wanted), raw.shape[-1])  # a vocabulary smaller than N has fewer alternatives
    parts = [tokens.double(), raw.gather(1, picked.unsqueeze(1)).squeeze(1).double()]
    if top_n:
        top_logprobs, top_ids = raw.topk(top_n, dim=-1)  # sorted, most likely first
        parts += [top_ids.flatten().double(), top_logprobs.flatten().double()]

    def unpack(packed: list[float]) -> tuple[list[int], list[SampleLogprobs | None]]:
        sampled = [int(token) for token in packed[:num_rows]]
        chosen = packed[num_rows : num_rows + num_asking]
        ids_start = num_rows + num_asking
        values_start = ids_start + num_asking * top_n
        result: list[SampleLogprobs | None] = [None] * num_rows
        for i, (row, n) in enumerate(zip(rows, wanted)):
            ids_at, values_at = ids_start + i * top_n, values_start + i * top_n
            count = min(n, top_n)
            top_ids = [int(token) for token in packed[ids_at : ids_at + count]]
            result[row] = SampleLogprobs(chosen[i], top_ids, packed[values_at : values_at + count])
        return sampled, result

    return _PendingSample(torch.cat(parts), unpack, tokens=tokens)
