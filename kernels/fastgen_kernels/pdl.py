"""Programmatic dependent launch (PDL, sm_90 and newer) for the kernels of a decode step.

A decode step at small batch is a chain of short kernels, each bound by memory bandwidth, and
between two of them the GPU idles: the first one's last programs drain, the next one is launched
and ramps up its loads. Launched with PDL, a kernel may start while the kernel before it on the
stream still runs, once every program of that one has called ``griddepcontrol.launch_dependents``
(or exited). It then does what needs no input of the previous kernel (a matmul streams its
weights towards the L2) and calls ``griddepcontrol.wait``, which returns when the previous
kernel has finished and its writes are visible.

The rules every kernel taking part keeps:

- launched with PDL (``launch_pdl=True``), it calls :func:`wait_for_previous` in every program
  before it reads anything an earlier kernel wrote and before it writes anything, so the wait
  chains: each kernel waits for its predecessor, which waited for its own;
- before that wait it only reads what no kernel of the step writes (weights);
- it calls :func:`release_dependents` early, so the next kernel's programs may become resident as
  soon as this one's are all running.

A kernel launched without PDL is ordered by the stream as usual, and one launched with it after a
plain kernel waits for that kernel to finish.

Off unless ``FASTGEN_PDL=1``: measured on an H100 (benchmarks/NOTES-kernels.md, "Programmatic
dependent launch"), it made the batch-1 decode step slower (Llama-3-8B shape 4%, Llama-2-7B 1%)
and batch 8 faster (2%). It is never on before sm_90 or in the interpreter, where the instructions
do not exist.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _turned_on() -> bool:
    return os.environ.get("FASTGEN_PDL", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _device_supports(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: with ``FASTGEN_PDL=1`` on a CUDA device of
    sm_90 or newer."""
    return device.type == "cuda" and _turned_on() and _device_supports(device)


def launch_options(device: torch.device) -> dict[str, bool]:
    """The launch arguments of a kernel that takes part: its ``USE_PDL`` constexpr and Triton's
    ``launch_pdl``, which must agree (a kernel launched with PDL that does not wait would race)."""
    on = pdl_enabled(device)
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_previous(ENABLED: tl.constexpr):
    """Block until the kernel launched before this one has finished and its writes are visible
    (a no-op unless ``ENABLED``)."""
    if ENABLED:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def release_dependents(ENABLED: tl.constexpr):
    """Let the kernel launched after this one start (a no-op unless ``ENABLED``)."""
    if ENABLED:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def enter(ENABLED: tl.constexpr):
    """A PDL-launched kernel's start (no-op unless ``ENABLED``): release the next kernel, then wait
    for the previous one. Every program calls it before touching what another kernel writes."""
    release_dependents(ENABLED)
    wait_for_previous(ENABLED)


@triton.jit
def prefetch_to_l2(addresses, num_bytes):
    """Ask the L2 to fetch ``num_bytes`` from each address (int64 tensor; addresses and size
    16-byte aligned): one bulk request a lane, nothing waits for it."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; // $0", "=r,l,r",
                              [addresses, num_bytes], dtype=tl.int32, is_pure=False, pack=1)
