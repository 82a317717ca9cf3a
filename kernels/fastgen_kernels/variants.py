"""Which Triton kernel variants this process has compiled.

Triton compiles a kernel once per variant (constexprs, dtypes, and the integer and pointer
arguments it specializes on), when the variant is first launched; a compile takes seconds. An
engine compiles every variant it can launch while it starts, so that no step stalls on one later:
`CompileWatch` tells when a step compiled something all the same, and what.
"""

from __future__ import annotations

import importlib

from triton.runtime.jit import JITFunction

_KERNEL_MODULES = (
    "activation",
    "attention_triton",
    "cache",
    "gemv",
    "moe",
    "norm",
    "quant",
    "rotary",
    "sampling",
)


def jit_functions() -> dict[str, JITFunction]:
    """Every Triton kernel of this package by ``module.name`` (empty under ``TRITON_INTERPRET=1``,
    where the kernels are interpreted, not compiled)."""
    found: dict[str, JITFunction] = {}
    for module_name in _KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction):
                found[f"{module_name}.{name}"] = value
    return found


def _variant_count(function: JITFunction) -> int:
    # each device's entry starts with its kernel cache: specialization key -> compiled kernel
    return sum(len(entry[0]) for entry in function.device_caches.values())


class CompileWatch:
    """Counts compiled variants per kernel; `new_compiles` names those compiled since the last call."""

    def __init__(self) -> None:
        self._functions = jit_functions()
        self._seen = self._counts()

    def _counts(self) -> dict[str, int]:
        return {name: _variant_count(function) for name, function in self._functions.items()}

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def new_compiles(self) -> dict[str, int]:
        """Kernel name -> variants compiled since the previous call (or since the watch began)."""
        counts = self._counts()
        new = {name: count - self._seen[name] for name, count in counts.items() if count > self._seen[name]}
        self._seen = counts
        return new
