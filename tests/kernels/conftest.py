"""Kernel tests: Triton's interpreter on CPU-only machines, compiled kernels where CUDA exists.

``TRITON_INTERPRET`` must be set before ``fastgen.kernels`` is imported anywhere in the process
(``triton.jit`` reads it when a kernel is decorated); tests/conftest.py does it for the whole suite,
and this file does it again for runs of this directory alone.
"""

import os
import random
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Fail loudly if fastgen.kernels was imported before the interpreter was switched on."""
    module = sys.modules.get("fastgen.kernels.activation")
    if module is None or torch.cuda.is_available():
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(module._gelu_kernel, InterpretedFunction):
        raise pytest.UsageError(
            "fastgen.kernels was imported before TRITON_INTERPRET=1 was set; tests/conftest.py must "
            "set it at import time (see tests/kernels/conftest.py)"
        )


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled kernels), else CPU (the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed per test (``FASTGEN_TEST_SEED`` replays one); printed, so failures show it."""
    value = int(os.environ.get("FASTGEN_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay with FASTGEN_TEST_SEED={value})")
    return value
