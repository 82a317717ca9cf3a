"""The fused small-batch linears in the model (``gated_down``: SiLU-and-mul folded into the down
projection; ``norm_linear``: a pre-norm RMSNorm folded into the next projection): with
``gated_down`` on a step gives the same logits, to the bit, as with the fusions off; with
``norm_linear`` on too, the same logits to within :data:`LOGIT_ULPS` ulps of the model dtype at the
step's largest logit (the comment at ``LOGIT_ULPS`` says why). ``qkv_rotary`` (the QKV projection
rotating and writing the KV cache in its epilogue) gives the same logits, to the bit, as the
projection followed by the rotary and the cache write.

The model takes them where the small-batch kernel runs: half-precision decode rows on CUDA. On the
CPU the test moves that rule onto CPU tensors and runs the norm, activation and linear kernels in
Triton's interpreter (float16), so the fused kernels meet the unfused ones inside a real model
step (decodes fused, prompt chunks of more than 8 rows not). The GPU tests switch the fusions off
through ``FASTGEN_FUSIONS_OFF``, as benchmarks do.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastgen.kernels import activation, fused_linear, gemv, norm, qkv_rotary

from fastgen.layers import linear as linear_layers
from fastgen.layers import mlp as mlp_layers
from fastgen.models import decoder
from tests.helpers import engine_greedy
from tests.models.test_hf_parity import CASES, prompts_of_mixed_lengths
from tests.test_fusions import mixed_plans, step_logits

FUSED_LINEARS = "gated_down,norm_linear"
MODEL_CASES = {
    name: CASES[name]
    for name in [
        "llama-gqa-llama3-rope",  # both fusions
        "qwen3-qk-norm-head-dim",  # q/k norms after the fused qkv projection
        "gemma-geglu-mqa-offset-norms-scaled-embeddings",  # norm weight offset; GeGLU: no gated_down
        "phi-parallel-block-partial-rotary",  # parallel block: neither
    ]
}
EXPECTED_CALLS = {  # per layer and decode step: (silu_and_mul_linear, rms_norm_linear)
    "llama-gqa-llama3-rope": (1, 2),
    "qwen3-qk-norm-head-dim": (1, 2),
    "gemma-geglu-mqa-offset-norms-scaled-embeddings": (0, 2),
    "phi-parallel-block-partial-rotary": (0, 0),
}
# norm_linear's RMS statistic is a tl.sum in the GEMV's layout, the norm kernel's in its own, so its
# outputs may differ from the unfused ones by a few half-precision ulps (the kernel tests bound
# them: tests/kernels/test_fused_linear.py, norm_linear_envelope) and the layers after carry that
# on. Measured on the CPU models below (float16, interpreter), with the fused statistic scaled by
# 1 + 4 * 2**-23 and by 1 + 64 * 2**-23 in every layer (two orders of one float32 sum usually differ
# by a few ulps): logits within 1.5 ulps at the step's largest either way; 4 keeps a margin.
LOGIT_ULPS = 4


def assert_logits_close(fused: list[torch.Tensor], unfused: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Each step's logits within ``LOGIT_ULPS`` ulps of ``dtype`` at that step's largest logit (a
    wrong norm, residual or projection moves logits by a sizable part of that largest)."""
    for step, (got, want) in enumerate(zip(fused, unfused, strict=True)):
        tolerance = LOGIT_ULPS * torch.finfo(dtype).eps * want.abs().max()
        difference = (got - want).abs().max()
        assert difference <= tolerance, f"step {step}: max difference {difference} > {tolerance}"


def assert_logits_equal(fused: list[torch.Tensor], unfused: list[torch.Tensor]) -> None:
    for step, (got, want) in enumerate(zip(fused, unfused, strict=True)):
        assert torch.equal(got, want), f"step {step}: max difference {(got - want).abs().max()}"


@pytest.fixture
def count_calls(monkeypatch) -> dict[str, int]:
    """Calls of the two fused kernels' public functions, by name."""
    calls = {"silu_and_mul_linear": 0, "rms_norm_linear": 0}
    for name in calls:
        original = getattr(linear_layers.kernels, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(linear_layers.kernels, name, counting)
    return calls


@pytest.fixture
def small_batch_kernels_on_cpu(monkeypatch) -> None:
    """The small-batch rule without its CUDA condition, and the Triton kernels it leads to (norm,
    activation, linear, fused linear; the interpreter) instead of the CPU references."""

    def small_batch(x: torch.Tensor) -> bool:
        return x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 2 and x.shape[0] <= 8

    for module in (linear_layers, mlp_layers, decoder):
        monkeypatch.setattr(module, "small_batch", small_batch)
    for module in (norm, activation, gemv, fused_linear):
        monkeypatch.setattr(module, "use_triton", lambda tensor: True)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_cpu_interpreted_fused_linears_change_no_logit(
    toy_checkpoint, case, fusions_off, small_batch_kernels_on_cpu, count_calls
):
    family, overrides = MODEL_CASES[case]
    path = toy_checkpoint(family, **overrides)
    plans = mixed_plans(num_mixed=2, num_decode_only=2)
    fusions_off(FUSED_LINEARS)
    unfused = step_logits(path, plans, dtype="float16", device="cpu")
    assert count_calls == {"silu_and_mul_linear": 0, "rms_norm_linear": 0}
    num_layers = decoder.ModelConfig.from_pretrained(path).num_layers
    decode_steps = sum(1 for plan in plans if sum(len(c.token_ids) for c in plan.chunks) <= 8)
    silu_calls, norm_calls = EXPECTED_CALLS[case]
    assert decode_steps >= 2
    fusions_off("norm_linear")
    assert_logits_equal(step_logits(path, plans, dtype="float16", device="cpu"), unfused)
    gated_down_calls = silu_calls * num_layers * decode_steps
    assert count_calls == {"silu_and_mul_linear": gated_down_calls, "rms_norm_linear": 0}
    fusions_off("qkv_rotary")  # its QKV projection normalizes too: tested below
    fused = step_logits(path, plans, dtype="float16", device="cpu")
    assert count_calls["silu_and_mul_linear"] == 2 * gated_down_calls
    assert count_calls["rms_norm_linear"] == norm_calls * num_layers * decode_steps
    assert_logits_close(fused, unfused, torch.float16)


# qkv_rotary (the QKV projection rotating and writing the cache in its epilogue): whether the model
# takes it, at one-row decode steps (a tile of pairs within a head of 16 features) and at 2-8 rows
# where the head has 64 (the tensor-core tile holds 32 pairs; narrower heads take the two kernels)
QKV_ROTARY_CASES = {
    "llama-gqa-llama3-rope": True,
    "llama-mha": True,
    "llama-head-dim-64": True,
    "qwen3-qk-norm-head-dim": False,  # q/k norms between the projection and the rotary
    "phi-parallel-block-partial-rotary": False,  # partial rotary
}
CPU_QKV_ROTARY_CASES = ["llama-gqa-llama3-rope", "llama-head-dim-64", "phi-parallel-block-partial-rotary"]
QKV_ROTARY_MODELS = {**CASES, "llama-head-dim-64": ("llama", dict(head_dim=64))}


@pytest.fixture
def count_qkv_rotary(monkeypatch) -> list[int]:
    """How many projections the fused kernel served (it returns None where it declines)."""
    served = [0]
    fused = qkv_rotary.qkv_rotary_linear_triton

    def counting(*args, **kwargs):
        result = fused(*args, **kwargs)
        served[0] += result is not None
        return result

    monkeypatch.setattr(qkv_rotary, "qkv_rotary_linear_triton", counting)
    return served


@pytest.mark.parametrize("case", CPU_QKV_ROTARY_CASES)
def test_cpu_interpreted_qkv_rotary_changes_no_logit(
    toy_checkpoint, case, fusions_off, small_batch_kernels_on_cpu, count_qkv_rotary, monkeypatch
):
    """Logits to the bit with the QKV projection rotating and writing the cache (interpreted) and
    with the projection and the references' rotary and cache write (the CPU model's own)."""
    monkeypatch.setattr(qkv_rotary, "use_triton", lambda tensor: True)
    family, overrides = QKV_ROTARY_MODELS[case]
    path = toy_checkpoint(family, **overrides)
    plans = [mixed_plans(num_mixed=1, num_decode_only=3), mixed_plans(num_mixed=3, num_decode_only=2, seed=1)]
    fusions_off("qkv_rotary")
    unfused = [step_logits(path, steps, dtype="float16", device="cpu") for steps in plans]
    assert count_qkv_rotary[0] == 0
    fusions_off("")
    fused = [step_logits(path, steps, dtype="float16", device="cpu") for steps in plans]
    num_layers = decoder.ModelConfig.from_pretrained(path).num_layers
    if not QKV_ROTARY_CASES[case]:
        assert count_qkv_rotary[0] == 0
    elif case == "llama-head-dim-64":  # every decode-sized step of both plan lists
        rows = [sum(len(chunk.token_ids) for chunk in plan.chunks) for steps in plans for plan in steps]
        small_steps = sum(count <= 8 for count in rows)
        assert count_qkv_rotary[0] == num_layers * small_steps
    else:  # the one-row steps only
        assert count_qkv_rotary[0] >= num_layers * 3
    for got, want in zip(fused, unfused, strict=True):
        assert_logits_equal(got, want)


def test_cpu_keeps_the_unfused_path(toy_checkpoint, count_calls) -> None:
    """Without CUDA neither fusion is taken: the CPU model is what it was."""
    family, overrides = CASES["llama-gqa-llama3-rope"]
    path = toy_checkpoint(family, **overrides)
    step_logits(path, mixed_plans(num_mixed=1, num_decode_only=1), dtype="float16", device="cpu")
    assert count_calls == {"silu_and_mul_linear": 0, "rms_norm_linear": 0}


# ---- GPU ----


@pytest.fixture
def deterministic_split_k(monkeypatch) -> None:
    """Split-K linears sum their partials in a second launch, not by float32 atomics (whose order
    of arrival may change a last bit between any two runs), so that logits compare bit for bit."""
    choose = gemv.choose_config

    def two_launch(*args, **kwargs) -> gemv.GemvConfig:
        return dataclasses.replace(choose(*args, **kwargs), atomic_reduce=False)

    monkeypatch.setattr(gemv, "choose_config", two_launch)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8-weights"])
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "gemma-geglu-mqa-offset-norms-scaled-embeddings"])
def test_gpu_fused_linears_change_no_logit(
    toy_checkpoint, case, cuda_graphs, quantization, fusions_off, count_calls, deterministic_split_k
):
    """bfloat16 steps (decode graphs and piecewise graphs of mixed steps, or eager) give the same
    logits, to the bit, with gated_down and without the fused linears; with norm_linear as well,
    the same to within ``LOGIT_ULPS`` bfloat16 ulps at each step's largest logit."""
    family, overrides = CASES[case]
    path = toy_checkpoint(family, **overrides)
    plans = mixed_plans()
    config = dict(dtype="bfloat16", device="cuda", cuda_graphs=cuda_graphs, token_budget=64, max_seqs=16,
                  quantization=quantization)  # fmt: skip
    fusions_off(FUSED_LINEARS)
    unfused = step_logits(path, plans, **config)
    assert count_calls == {"silu_and_mul_linear": 0, "rms_norm_linear": 0}
    fusions_off("norm_linear")
    gated_down_only = step_logits(path, plans, **config)
    assert count_calls["rms_norm_linear"] == 0
    assert_logits_equal(gated_down_only, unfused)
    fusions_off("qkv_rotary")
    fused = step_logits(path, plans, **config)
    assert count_calls["rms_norm_linear"] > 0
    assert_logits_close(fused, unfused, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8-weights"])
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("case", QKV_ROTARY_CASES)
def test_gpu_qkv_rotary_changes_no_logit(toy_checkpoint, case, cuda_graphs, quantization, fusions_off,
                                         count_qkv_rotary, deterministic_split_k):
    """bfloat16 steps (decode graphs at one row and at several, or eager) give the same logits, to
    the bit, with the QKV projection rotating and writing the cache and with the two kernels."""
    family, overrides = QKV_ROTARY_MODELS[case]
    path = toy_checkpoint(family, **overrides)
    config = dict(dtype="bfloat16", device="cuda", cuda_graphs=cuda_graphs, token_budget=64, max_seqs=16,
                  quantization=quantization)  # fmt: skip
    plans = [mixed_plans(num_mixed=1, num_decode_only=3), mixed_plans(num_mixed=3, num_decode_only=2, seed=1)]
    fusions_off("qkv_rotary")
    unfused = [step_logits(path, steps, **config) for steps in plans]
    assert count_qkv_rotary[0] == 0
    fusions_off("")
    fused = [step_logits(path, steps, **config) for steps in plans]
    assert (count_qkv_rotary[0] > 0) == QKV_ROTARY_CASES[case]
    for got, want in zip(fused, unfused, strict=True):
        assert_logits_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", ["gated_down", "norm_linear", "qkv_rotary"])
def test_gpu_greedy_tokens_equal_with_fusion_on_and_off(toy_checkpoint, fusion, fusions_off):
    family, overrides = CASES["llama-gqa-llama3-rope"]
    path = toy_checkpoint(family, **overrides)
    prompts = prompts_of_mixed_lengths(384)
    tokens = {}
    for names in (fusion, ""):
        fusions_off(names)
        # float32: the small-batch GEMV (and so its prologues) serves half precision only, so this
        # checks that turning a fusion on changes nothing else; bf16 logits: the tests above
        tokens[names] = engine_greedy(
            path, prompts, 24, token_budget=16, device="cuda", kv_cache_bytes=1 << 28
        )
    assert tokens[""] == tokens[fusion]
