"""Small-batch linear layers for decode: ``y = x @ weight.T (+ bias)`` with x [M, K], M <= 8.

At decode a 7B model multiplies a handful of activation rows by every weight matrix once per
step, so the weights are the only large traffic and the product is bound by memory bandwidth:
the kernel must stream ``weight`` [N, K] (nn.Linear layout, K contiguous) at copy speed and do
nothing else that costs time. How it does that:

- **Tiles of weight rows.** A program owns ``BLOCK_N`` rows of ``weight`` and a range of K; it
  walks K in ``BLOCK_K`` steps, each step one coalesced tile of 16-byte loads along K, and
  ``tl.range(num_stages=...)`` keeps several steps of loads in flight (software pipelining).
- **M as a constexpr tile.** ``BLOCK_M = next_power_of_2(M)`` (1, 2, 4 or 8) selects a
  specialized kernel; padded rows are masked on load and store, so they cost no memory traffic.
- **Two ways to multiply.** ``use_dot=False`` multiplies on the CUDA cores, keeping a
  [BLOCK_M, BLOCK_N, BLOCK_K] float32 accumulator and reducing over K once after the loop (no
  per-step shuffles); it is the natural GEMV for M = 1. ``use_dot=True`` hands the tile to the
  tensor cores (``tl.dot``, M padded to the instruction size inside registers only): for M >= 2
  the CUDA-core version would spend more instructions than the memory system leaves room for.
- **Split-K when N is small.** With N = 4096 there are too few row tiles to give every SM
  several programs; the grid then also splits K. Partial sums are combined either by float32
  atomics into a workspace, the last program of a tile to arrive (counted by a per-tile atomic
  counter) writing the output and zeroing the workspace again (one launch), or by a second tiny
  kernel over per-split partials (two launches, deterministic). ``benchmarks/gemv.py`` measures
  both.

- **A prologue on the activations.** ``PROLOGUE`` lets the kernel compute its activations as it
  loads them, from ``gate_up`` (SiLU-and-mul) or from the residual stream (RMSNorm, with the rows'
  sums of squares taken over all of K before the loop): the fused ops of ``fused_linear.py``.

Everything is CUDA-graph capturable: no host synchronization, and workspaces sized from shapes
alone. The atomic workspace is kept per (device, N, BLOCK_N) and left zeroed by every call, so
calls must not run concurrently on two streams of one device (the engine uses one). It is made
on the first eager call; a first call *during* capture uses the two-launch reduction instead.

FP8 weights (e4m3, with one float32 scale per output row, as ``EngineConfig.quantization="fp8"``
stores them) stream at one byte a weight: the kernel widens each tile to the activations' dtype
in registers (exact: every e4m3 value is a bf16/fp16 value) and scales the row sums once, so a
decode step reads half the bytes of bf16 and the activations are not quantized (W8A16).

Accumulation is float32 with the bias added in float32 and one rounding to x's dtype at the end,
as :func:`linear_small_batch_reference` does. :func:`linear_small_batch_triton` returns ``None``
when it does not apply (M > 8, K-strided weight, mixed dtypes), and the caller keeps cuBLAS;
:func:`linear_small_batch` does that dispatch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl
from ._dispatch import use_triton
from .activation import _silu_mul
from .norm import _add_residual, _rms_rstd, _rms_scale
from .pdl import prefetch_to_l2
from .quant import FP8

MAX_ROWS = 8  # largest M served; the caller keeps cuBLAS beyond
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_small_batch_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` accumulated in float32 and rounded once to x's
    dtype; written into ``out`` (shape ``x.shape[:-1] + (N,)``) when given. ``weight_scale``
    ([N, 1] or [N], float32) comes with FP8 weights."""
    full = weight.float() if weight_scale is None else weight.float() * weight_scale.float().reshape(-1, 1)
    result = F.linear(x.float(), full, None if bias is None else bias.float()).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@triton.jit
def _rms_rows(
    x_ptr, residual_ptr, residual_out_ptr, M, K, eps, stride_xm, stride_rm, stride_rom, residual_cols,
    BLOCK_M: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROW_BLOCK: tl.constexpr,
):
    """Fused RMSNorm prologue: [BLOCK_M] reciprocal RMS of the rows of ``x (+ residual)`` over all
    of K, each row by the norm kernel's own helper (its ``tl.sum`` adds in this kernel's layout's
    order, so the last float32 bit may differ from the norm kernel's). The new residual rows
    are stored up to column ``residual_cols``: K in one program, 0 in the others."""
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, ROW_BLOCK)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    # a loop, not unrolled: ptxas would hoist every row's loads and spill (sm_90, Triton 3.9)
    for row in tl.range(0, M, num_stages=1):
        hidden = tl.load(x_ptr + row * stride_xm + cols, mask=cols < K, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_rm + cols, mask=cols < K, other=0.0)
            hidden = _add_residual(hidden, residual)
            tl.store(residual_out_ptr + row * stride_rom + cols, hidden, mask=cols < residual_cols)
        rstd = tl.where(offs_m == row, _rms_rstd(hidden.to(tl.float32), K, eps), rstd)
    return rstd


@triton.jit
def _load_activations(
    x_ptrs, residual_ptrs, norm_weight_ptrs, x_mask, k_mask, rstd, K,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """A tile of the activations the product reads, in x's dtype: x itself, or the values the
    unfused kernel would have written (``silu_and_mul`` of the gate and up halves, or RMSNorm of
    x + residual), rounded the same way in registers."""
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if PROLOGUE == "silu_mul":  # x is the gate half; the up half starts K further
        up = tl.load(x_ptrs + K, mask=x_mask, other=0.0)
        x = _silu_mul(x, up, x.dtype)
    elif PROLOGUE == "rms_norm":
        if HAS_RESIDUAL:
            x = _add_residual(x, tl.load(residual_ptrs, mask=x_mask, other=0.0))
        if k_mask is None:  # K a multiple of BLOCK_K
            norm_weight = tl.load(norm_weight_ptrs)
        else:
            norm_weight = tl.load(norm_weight_ptrs, mask=k_mask, other=0.0)
        x = _rms_scale(x, rstd, norm_weight, x.dtype)
    return x


@triton.jit
def _product_tile(
    x_ptr, w_ptr, scale_ptr, residual_ptr, norm_weight_ptr, rstd, offs_m, offs_n, m_mask, n_mask,
    k_start, k_end, K, stride_xm, stride_wn, stride_rm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """float32 [BLOCK_M, BLOCK_N]: the activations' rows ``offs_m`` times the weight rows ``offs_n``
    (any rows: a tile need not be contiguous) over K range [k_start, k_end), scaled per row for
    FP8 weights; the loop of every small-batch kernel (the plain GEMV, the QKV one with rotary)."""
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = offs_n.to(tl.int64) * stride_wn
    if USE_DOT:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        r_ptrs = residual_ptr + offs_m[:, None] * stride_rm + offs_k[None, :]
        nw_ptrs = norm_weight_ptr + offs_k[None, :]
        w_ptrs = w_ptr + w_rows[:, None] + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            if EVEN_K:
                x = _load_activations(x_ptrs + k, r_ptrs + k, nw_ptrs + k, m_mask[:, None], None,
                                      rstd[:, None], K, PROLOGUE, HAS_RESIDUAL)
                if EVEN_N:
                    w = tl.load(w_ptrs + k)
                else:
                    w = tl.load(w_ptrs + k, mask=n_mask[:, None], other=0.0)
            else:
                k_mask = (k + offs_k) < K
                x = _load_activations(x_ptrs + k, r_ptrs + k, nw_ptrs + k, m_mask[:, None] & k_mask[None, :],
                                      k_mask[None, :], rstd[:, None], K, PROLOGUE, HAS_RESIDUAL)
                w = tl.load(w_ptrs + k, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    else:
        # 3-D: [BLOCK_M, 1, BLOCK_K] activations times [1, BLOCK_N, BLOCK_K] weights, summed over K
        # once after the loop so that the loop body is loads and FMAs only
        x_ptrs = x_ptr + offs_m[:, None, None] * stride_xm + offs_k[None, None, :]
        r_ptrs = residual_ptr + offs_m[:, None, None] * stride_rm + offs_k[None, None, :]
        nw_ptrs = norm_weight_ptr + offs_k[None, None, :]
        w_ptrs = w_ptr + w_rows[None, :, None] + offs_k[None, None, :]
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            if EVEN_K:
                x = _load_activations(x_ptrs + k, r_ptrs + k, nw_ptrs + k, m_mask[:, None, None], None,
                                      rstd[:, None, None], K, PROLOGUE, HAS_RESIDUAL)
                if EVEN_N:
                    w = tl.load(w_ptrs + k)
                else:
                    w = tl.load(w_ptrs + k, mask=n_mask[None, :, None], other=0.0)
            else:
                k_mask = (k + offs_k) < K
                x = _load_activations(x_ptrs + k, r_ptrs + k, nw_ptrs + k,
                                      m_mask[:, None, None] & k_mask[None, None, :], k_mask[None, None, :],
                                      rstd[:, None, None], K, PROLOGUE, HAS_RESIDUAL)
                w = tl.load(w_ptrs + k, mask=n_mask[None, :, None] & k_mask[None, None, :], other=0.0)
            acc3 += x.to(tl.float32) * w.to(tl.float32)
        acc = tl.sum(acc3, axis=2)
    if HAS_SCALE:  # per output row; linear, so partial sums of a split may be scaled too
        acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, workspace_ptr, counter_ptr,
    residual_ptr, residual_out_ptr, norm_weight_ptr, eps,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_rm, stride_rom,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr, USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROW_BLOCK: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH_ROW_BYTES: tl.constexpr, PREFETCH_PIECES: tl.constexpr,
):
    """Program (pid_n, pid_k): rows [pid_n * BLOCK_N, +BLOCK_N) of weight over K range pid_k.
    ``PROLOGUE`` names what the activations are made of (see :func:`_load_activations`).
    With ``USE_PDL`` the program first asks the L2 for the first ``PREFETCH_ROW_BYTES`` of each of
    its weight rows, then waits for the previous kernel (``pdl.py``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PREFETCH_ROW_BYTES > 0:  # weights only: no kernel of the step writes them
        row_bytes = tl.minimum((k_end - k_start) * w_ptr.dtype.element_ty.primitive_bitwidth // 8,
                               PREFETCH_ROW_BYTES)
        if row_bytes > 0:
            # each row in PREFETCH_PIECES requests: a [BLOCK_N, PIECES] tile has a lane of its own
            # per request (a [BLOCK_N] one would repeat each row's request on several lanes)
            piece_bytes = row_bytes // PREFETCH_PIECES
            rows = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # masked rows repeat the last
            pieces = tl.arange(0, PREFETCH_PIECES).to(tl.int64) * piece_bytes
            prefetch_to_l2((w_ptr + rows + k_start).to(tl.int64)[:, None] + pieces[None, :], piece_bytes)
    pdl.enter(USE_PDL)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == "rms_norm":
        rstd = _rms_rows(x_ptr, residual_ptr, residual_out_ptr, M, K, eps, stride_xm, stride_rm, stride_rom,
                         tl.where((pid_n == 0) & (pid_k == 0), K, 0), BLOCK_M, HAS_RESIDUAL, ROW_BLOCK)

    acc = _product_tile(
        x_ptr, w_ptr, scale_ptr, residual_ptr, norm_weight_ptr, rstd, offs_m, offs_n, m_mask, n_mask,
        k_start, k_end, K, stride_xm, stride_wn, stride_rm,
        BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, HAS_SCALE, PROLOGUE, HAS_RESIDUAL, EVEN_N, EVEN_K,
        DOT_PRECISION, NUM_STAGES,
    )
    out_mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif ATOMIC:
        # float32 workspace [M, N], zero on entry; the last program of this row tile to arrive
        # takes the sum (zeroing the workspace as it reads) and resets the tile's counter
        work_ptrs = workspace_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(work_ptrs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds precede the counter's release
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # read-and-zero in one atomic, on the bits (float atomic_xchg is missing in the interpreter)
            bits = tl.atomic_xchg(work_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros_like(acc).to(tl.int32),
                                  mask=out_mask, sem="relaxed")
            total = tl.where(out_mask, bits.to(tl.float32, bitcast=True), 0.0)  # masked lanes: undefined
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed")
    else:
        # per-split partials [SPLIT_K, M, N], summed in split order by _split_k_sum_kernel
        work_ptrs = workspace_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(work_ptrs, acc, mask=out_mask)


@triton.jit
def _split_k_sum_kernel(
    partial_ptr, bias_ptr, out_ptr, M, N, stride_om,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Second pass of the two-launch split-K: out[row] = sum of SPLIT_K partial rows (+ bias)."""
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + (split * M + row) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of one small-batch linear; :func:`choose_config` picks them by shape."""

    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = False
    atomic_reduce: bool = True  # split-K: float32 atomics, one launch (else per-split partials, two)
    num_warps: int = 4
    num_stages: int = 4
    # launched with PDL: bytes of its weights a program asks the L2 for before it waits (0: none)
    prefetch_bytes: int = 32768


def path_tile(block_m: int, use_dot: bool, weight_bytes: int = 2) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of each multiply path for a row bucket (4 warps, 128 threads).
    One-byte (FP8) weights take twice the K per tile, keeping 16-byte loads and bytes per stage.

    CUDA cores: 8 bf16 (16 bytes) per thread along K and 256 K per warp; BLOCK_N shrinks as
    BLOCK_M grows so that the float32 accumulator stays at <= 64 registers a thread
    (BLOCK_M * BLOCK_N * BLOCK_K / 128). Tensor cores: a 64 x 128 weight tile, 16 KB a stage;
    with num_stages=4 Triton keeps three stages in flight (~50 KB of shared memory, four programs
    an SM). Both issue 16-byte cp.async loads of the weight (checked in sm_90 PTX, Triton 3.9).
    """
    widen = 2 // weight_bytes if weight_bytes < 2 else 1
    if use_dot:
        return 64, 128 * widen
    return {1: 16, 2: 16, 4: 8, 8: 4}[block_m], 256 * widen


MIN_SPLIT_ROW_BYTES = 8192


def choose_config(
    m: int, n: int, k: int, num_sms: int = 132, use_dot: bool | None = None, weight_bytes: int = 2
) -> GemvConfig:
    """The shape rule (no autotuning: CUDA graphs need the launch fixed before capture).

    - M = 1 multiplies on the CUDA cores, M >= 2 on the tensor cores (see the module doc);
      ``use_dot`` overrides that (the benchmark times both paths).
    - Split K by powers of two until the grid has at least two programs per SM (so every SM
      streams from two tiles and one program's pipeline ramp hides behind another's loads),
      at most 8 ways, keeping >= 4 K steps per split so the pipeline reaches steady state.
      On the CUDA cores, a grid with a program on every SM already splits only where each split
      keeps `MIN_SPLIT_ROW_BYTES` of every weight row (Llama-2-7B at M = 1: o_proj, K = 4096,
      runs unsplit, down, K = 11008, in two with bf16 weights and unsplit with e4m3 ones;
      benchmarks/NOTES-kernels.md, "GEMV split rule").
    """
    block_m = triton.next_power_of_2(max(m, 1))
    if use_dot is None:
        use_dot = block_m >= 2
    block_n, block_k = path_tile(block_m, use_dot, weight_bytes)
    tiles = triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    split_k = 1
    while tiles * split_k < 2 * num_sms and split_k < 8 and k_steps // (2 * split_k) >= 4:
        if not use_dot and tiles >= num_sms and k * weight_bytes // (2 * split_k) < MIN_SPLIT_ROW_BYTES:
            break
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k, use_dot=use_dot)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend to be an H100 so CPU tests see the GPU's configs
    return torch.cuda.get_device_properties(device).multi_processor_count


_ATOMIC_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _atomic_workspace(device: torch.device, n: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Zeroed float32 [MAX_ROWS * n] sums and int32 per-tile counters, kept for the process
    (graphs captured with them keep their addresses); ``None`` when first asked for during
    graph capture, where a zero-fill would run only at replay."""
    key = (device, n, block_n)
    found = _ATOMIC_WORKSPACES.get(key)
    if found is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        found = (torch.zeros(MAX_ROWS * n, dtype=torch.float32, device=device),
                 torch.zeros(triton.cdiv(n, block_n), dtype=torch.int32, device=device))
        _ATOMIC_WORKSPACES[key] = found
    return found


@dataclass(frozen=True)
class Prologue:
    """What the product's activations are made of, computed as each tile is loaded
    (:func:`_load_activations`): ``"none"``, x itself; ``"silu_mul"``, x is ``gate_up`` [M, 2K]
    and the activations ``silu_and_mul(gate_up)``; ``"rms_norm"``, the activations are
    ``rms_norm(x (+ residual), norm_weight, eps)`` and the new residual goes to ``residual_out``
    (the fused ops of ``fused_linear.py`` make these)."""

    kind: str = "none"
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None  # [M, K] rows, unit column stride
    residual_out: torch.Tensor | None = None  # [M, K] rows, written by one program


NO_PROLOGUE = Prologue()
MAX_NORM_WIDTH = 8192  # the fused RMSNorm holds a row of K float32 per program in registers


def _applies(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    in_features: int | None = None,
) -> bool:
    """Whether the kernel serves this product; ``in_features`` is x's last dim when it is not K
    (``gate_up`` holds 2K)."""
    if weight_scale is None:
        weight_ok = weight.dtype == x.dtype
    else:
        weight_ok = (weight.dtype == FP8 and x.dtype != torch.float32 and weight_scale.dtype == torch.float32
                     and weight_scale.numel() == weight.shape[0] and weight_scale.device == weight.device)
    in_features = x.shape[-1] if in_features is None else in_features
    return (
        weight_ok and weight.dim() == 2 and in_features == weight.shape[1] and weight.stride(1) == 1
        and x.dtype in _DTYPES and x.device == weight.device
        and (bias is None or (bias.shape == (weight.shape[0],) and bias.dtype == x.dtype))
        and math.prod(x.shape[:-1]) <= MAX_ROWS
    )


def _output_rows(x: torch.Tensor, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out as given or new, its [M, N] view with unit column stride)."""
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {x.dtype} of shape {shape} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    rows = out if out.dim() == 2 else out.view(-1, n)
    if n > 1 and rows.stride(1) != 1:
        raise ValueError("out must have unit stride along its last dim")
    return out, rows


PREFETCH_PIECES = 8  # bulk L2 requests a weight row's prefetch is cut into


def _prefetch_row_bytes(weight: torch.Tensor, config: GemvConfig) -> int:
    """Bytes of each weight row a program prefetches to the L2 before its PDL wait: the config's
    budget over the tile's rows, cut into `PREFETCH_PIECES` requests of whole 16-byte units; 0
    where the bulk prefetch's 16-byte alignment of rows and split starts does not hold. (A split's
    K range is whole ``block_k`` tiles, whose bytes are a multiple of 16 x `PREFETCH_PIECES`.)"""
    k = weight.shape[1]
    row_stride_bytes = weight.stride(0) * weight.element_size()
    if k % config.block_k or row_stride_bytes % 16 or weight.data_ptr() % 16:
        return 0
    unit = 16 * PREFETCH_PIECES
    return config.prefetch_bytes // config.block_n // unit * unit


def product_arguments(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    prologue: Prologue,
    config: GemvConfig,
) -> dict[str, object]:
    """The launch arguments of a small-batch kernel's product (`_product_tile` and the norm
    prologue, `_rms_rows`) for ``rows`` (unit column stride: [M, K], or [M, 2K] for the SiLU-mul
    prologue) times ``weight`` [N, K], by the parameter names every such kernel shares; pointers a
    launch does not use are placeholders."""
    m, k = rows.shape[0], weight.shape[1]
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    residual = prologue.residual if prologue.residual is not None else rows
    residual_out = prologue.residual_out if prologue.residual_out is not None else rows
    return dict(
        x_ptr=rows, w_ptr=weight,
        scale_ptr=weight if weight_scale is None else weight_scale.reshape(-1),  # [N, 1]: a view
        bias_ptr=weight if bias is None else bias, residual_ptr=residual, residual_out_ptr=residual_out,
        norm_weight_ptr=prologue.norm_weight if prologue.kind == "rms_norm" else weight, eps=prologue.eps,
        stride_xm=rows.stride(0), stride_wn=weight.stride(0), stride_rm=residual.stride(0),
        stride_rom=residual_out.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_K=config.block_k, USE_DOT=config.use_dot,
        HAS_BIAS=bias is not None, HAS_SCALE=weight_scale is not None, PROLOGUE=prologue.kind,
        HAS_RESIDUAL=prologue.residual is not None,
        ROW_BLOCK=triton.next_power_of_2(k) if prologue.kind == "rms_norm" else 1,
        EVEN_K=k % config.block_k == 0,
        DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32", NUM_STAGES=config.num_stages,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def linear_small_batch_with_config(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    config: GemvConfig,
    weight_scale: torch.Tensor | None = None,
    prologue: Prologue = NO_PROLOGUE,
) -> torch.Tensor:
    """The Triton launch with explicit parameters (benchmarks and tests try variants through it);
    the caller has checked that the kernel applies (M <= 8, see :func:`linear_small_batch_triton`
    and, for a prologue, ``fused_linear.py``)."""
    n, k = weight.shape
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[-1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out, out_rows = _output_rows(x, n, out)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out_rows.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out_rows))
        return out
    split_k = max(1, min(config.split_k, triton.cdiv(k, config.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, config.block_k), split_k) * config.block_k
    atomic = config.atomic_reduce
    workspace = counters = out_rows  # placeholders when unused
    if split_k > 1:
        found = _atomic_workspace(x.device, n, config.block_n) if atomic else None
        if found is None:
            atomic = False
            workspace = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        else:
            workspace, counters = found
    product = product_arguments(rows, weight, bias, weight_scale, prologue, config)
    options = pdl.launch_options(x.device)
    grid = (triton.cdiv(n, config.block_n), split_k)
    _gemv_kernel[grid](
        out_ptr=out_rows, workspace_ptr=workspace, counter_ptr=counters,
        M=m, N=n, K=k, k_per_split=k_per_split, stride_om=out_rows.stride(0),
        BLOCK_N=config.block_n, SPLIT_K=split_k, ATOMIC=atomic, EVEN_N=n % config.block_n == 0,
        PREFETCH_ROW_BYTES=_prefetch_row_bytes(weight, config) if options["USE_PDL"] else 0,
        PREFETCH_PIECES=PREFETCH_PIECES, **product, **options,
    )
    if split_k > 1 and not atomic:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_sum_kernel[(triton.cdiv(n, block), m)](
            workspace, product["bias_ptr"], out_rows, m, n, out_rows.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return out


def choose_config_for(x_rows: int, weight: torch.Tensor, device: torch.device) -> GemvConfig:
    """:func:`choose_config` for ``x_rows`` rows times ``weight`` on ``device``."""
    n, k = weight.shape
    return choose_config(x_rows, n, k, _num_sms(device), weight_bytes=weight.element_size())


def linear_small_batch_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Triton ``x @ (weight * weight_scale).T + bias`` for at most 8 rows of x, launch chosen by
    :func:`choose_config`; ``None`` when the kernel does not apply (more rows, a weight that is
    not K-contiguous, mixed dtypes, FP8 weights without their scales or with float32 x): the
    caller then uses cuBLAS."""
    if not _applies(x, weight, bias, weight_scale):
        return None
    config = choose_config_for(math.prod(x.shape[:-1]), weight, x.device)
    return linear_small_batch_with_config(x, weight, bias, out, config, weight_scale)


def linear_small_batch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias``: the Triton kernel on CUDA when M <= 8, else torch
    (``F.linear``, i.e. cuBLAS, on CUDA; the float32 reference on CPU and for FP8 weights the
    kernel does not take)."""
    if use_triton(x):
        result = linear_small_batch_triton(x, weight, bias, out, weight_scale)
        if result is not None:
            return result
        if weight_scale is None:
            if out is None:
                return F.linear(x, weight, bias)
            out.copy_(F.linear(x, weight, bias))
            return out
    return linear_small_batch_reference(x, weight, bias, out, weight_scale)
