"""Programmatic dependent launch: where it is on, and a chain of dependent decode kernels launched
with it giving the same bits as run one by one (a kernel reading its input before the previous one
finished would not)."""

import pytest
import torch
from fastgen.kernels import pdl
from fastgen.kernels.activation import silu_and_mul
from fastgen.kernels.argmax import argmax_triton
from fastgen.kernels.fused_linear import rms_norm_linear_triton, silu_and_mul_linear_triton
from fastgen.kernels.gemv import GemvConfig, linear_small_batch_triton, linear_small_batch_with_config
from fastgen.kernels.norm import rms_norm


@pytest.fixture
def pdl_setting(monkeypatch):
    """Set ``FASTGEN_PDL`` for one test; the parsed value is cached per process."""

    def apply(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("FASTGEN_PDL", raising=False)
        else:
            monkeypatch.setenv("FASTGEN_PDL", value)
        pdl._turned_on.cache_clear()

    yield apply
    monkeypatch.undo()
    pdl._turned_on.cache_clear()


def test_off_on_the_cpu_whatever_the_setting(pdl_setting) -> None:
    for value in (None, "1", "0"):
        pdl_setting(value)
        assert not pdl.pdl_enabled(torch.device("cpu"))
        assert pdl.launch_options(torch.device("cpu")) == {"USE_PDL": False, "launch_pdl": False}


@pytest.mark.parametrize("value", ["1", "true", "ON", " yes "])
def test_fastgen_pdl_turns_it_on(pdl_setting, value) -> None:
    pdl_setting(value)
    assert pdl._turned_on()


@pytest.mark.parametrize("value", [None, "", "0", "off"])
def test_off_unless_turned_on(pdl_setting, value) -> None:
    pdl_setting(value)
    assert not pdl._turned_on()


def _layer_weights(hidden: int, inner: int, dtype: torch.dtype, device: torch.device) -> dict:
    scale = hidden**-0.5
    return {
        "norm": (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype),
        "up": (torch.randn(2 * inner, hidden, device=device) * scale).to(dtype),
        "down": (torch.randn(hidden, inner, device=device) * inner**-0.5).to(dtype),
        "out": (torch.randn(hidden, hidden, device=device) * scale).to(dtype),
    }


def _decode_chain(x: torch.Tensor, layers: list[dict], head: torch.Tensor) -> torch.Tensor:
    """Each kernel reads the one before it: fused norm + matmul (with the residual), SiLU-mul +
    matmul (split K), a norm, a plain matmul (split K), the unfused SiLU-mul, the argmax."""
    residual = torch.zeros_like(x)
    for weights in layers:
        gate_up, residual = rms_norm_linear_triton(x, weights["norm"], 1e-5, weights["up"], residual=residual)
        x = silu_and_mul_linear_triton(gate_up, weights["down"])
        x = linear_small_batch_triton(rms_norm(x, weights["norm"], 1e-5), weights["out"])
        x = linear_small_batch_triton(silu_and_mul(torch.cat([x, x], dim=-1)), weights["out"])
    return argmax_triton(linear_small_batch_triton(x + residual, head))


@pytest.mark.gpu
@pytest.mark.parametrize("pdl_on", ["1", "0"], ids=["pdl", "no-pdl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dependent_chain_in_a_graph_equals_the_eager_run(dtype, pdl_on, pdl_setting, seed) -> None:
    """Captured in a CUDA graph (how decode runs) and replayed on new inputs, the chain returns the
    eager run's bits, its kernels launched with PDL (sm_90 and newer) and without."""
    pdl_setting(pdl_on)
    cuda = torch.device("cuda")
    assert pdl.pdl_enabled(cuda) == (pdl_on == "1" and torch.cuda.get_device_capability() >= (9, 0))
    hidden, inner, vocab = 1024, 2816, 32000
    layers = [_layer_weights(hidden, inner, dtype, cuda) for _ in range(6)]
    head = (torch.randn(vocab, hidden, device=cuda) * hidden**-0.5).to(dtype)
    static_x = torch.randn(1, hidden, device=cuda).to(dtype)
    _decode_chain(static_x, layers, head)  # compiles every kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_token = _decode_chain(static_x, layers, head)
    for _ in range(5):
        x = torch.randn(1, hidden, device=cuda).to(dtype)
        eager_token = _decode_chain(x, layers, head)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_token, eager_token)


@pytest.mark.gpu
def test_gpu_prefetch_budgets_leave_the_product_unchanged(pdl_setting, seed) -> None:
    """Prefetching none, part or all of a program's weights before the PDL wait changes no bit."""
    pdl_setting("1")
    cuda = torch.device("cuda")
    x = torch.randn(1, 4096, device=cuda, dtype=torch.bfloat16)
    weight = torch.randn(4096, 4096, device=cuda, dtype=torch.bfloat16)
    configs = [GemvConfig(16, 256, split_k=1, prefetch_bytes=budget) for budget in (0, 4096, 32768, 1 << 20)]
    results = [linear_small_batch_with_config(x, weight, None, None, config) for config in configs]
    assert all(torch.equal(result, results[0]) for result in results[1:])
