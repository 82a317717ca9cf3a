"""Backend choice: Triton on CUDA tensors, the PyTorch reference elsewhere (paged attention has a
batched CPU path besides, see ``attention.paged_attention``).

``FASTGEN_KERNELS=reference`` forces the reference everywhere (debugging on a GPU).
``FASTGEN_FUSIONS_OFF`` turns fused kernels off by name (a comma list, or ``all``; empty: none off)
so that a benchmark can measure each fusion against the separate kernels it replaces. Unset, it
means ``all``: the fused kernels stay off by default until their GPU tests pass
(benchmarks/NOTES-kernels.md, "Fusions").
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


@functools.cache
def _fusions_off() -> frozenset[str]:
    names = os.environ.get("FASTGEN_FUSIONS_OFF", "all").lower().replace(" ", "")
    return frozenset(name for name in names.split(",") if name)


def fusion_enabled(name: str) -> bool:
    """False when ``FASTGEN_FUSIONS_OFF`` names the fusion ``name`` (or says ``all``)."""
    off = _fusions_off()
    return name not in off and "all" not in off
