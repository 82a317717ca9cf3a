"""Programmatic dependent launch (Hopper and later): a kernel launched with ``launch_pdl`` may be
scheduled before the kernel ahead of it in the stream has finished, so it must wait for that
kernel's writes before it touches memory another kernel writes or reads.

Every such kernel calls :func:`wait_for_previous` first, in every program: the previous kernel has
then completed, and (each of them having waited in turn) so has every kernel before it. It then
lets the next kernel be scheduled, whose programs take the SMs this kernel's programs free as
they end. Launch arguments come from ``_dispatch.pdl_launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
