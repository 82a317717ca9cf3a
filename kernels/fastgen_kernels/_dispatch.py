"""Backend choice: Triton on CUDA tensors, the PyTorch reference elsewhere (paged attention has a
batched CPU path besides, see ``attention.paged_attention``).

``FASTGEN_KERNELS=reference`` forces the reference everywhere (debugging on a GPU).
``FASTGEN_FUSIONS_OFF`` turns fused kernels off by name (a comma list, or ``all``; empty: none off)
so that a benchmark can measure each fusion against the separate kernels it replaces; set, the
fusions it leaves on serve every batch their kernels take. The names: ``gated_down``, ``norm_linear``
(``fused_linear.py``), ``rotary_kv`` (``rotary_kv.py``), ``qkv_rotary`` (``qkv_rotary.py``; where it
serves, the QKV projection writes the cache and ``rotary_kv`` has nothing left to do). Unset, the
measured default: every fusion for one-row steps only (batch-1 decode, where they were faster
together; at eight rows the GEMV prologues were slower: benchmarks/NOTES-kernels.md, "Fusions").
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _forced_reference() -> bool:
    return os.environ.get("FASTGEN_KERNELS", "").lower() == "reference"


def reference_forced() -> bool:
    """True when ``FASTGEN_KERNELS=reference`` turns the Triton kernels off."""
    return _forced_reference()


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` lives on a CUDA device and Triton kernels are not disabled."""
    return tensor.is_cuda and not _forced_reference()


DEFAULT_FUSED_ROWS = 1  # rows up to which the fusions serve when FASTGEN_FUSIONS_OFF is unset


@functools.cache
def _fusions_off() -> frozenset[str] | None:
    names = os.environ.get("FASTGEN_FUSIONS_OFF")
    if names is None:
        return None
    return frozenset(name for name in names.lower().replace(" ", "").split(",") if name)


def fusion_enabled(name: str, rows: int) -> bool:
    """Whether the fusion ``name`` serves a step of ``rows`` rows (tokens): unless
    ``FASTGEN_FUSIONS_OFF`` names it (or says ``all``); when unset, at up to `DEFAULT_FUSED_ROWS`."""
    off = _fusions_off()
    if off is None:
        return rows <= DEFAULT_FUSED_ROWS
    return name not in off and "all" not in off
