"""Fused kernels in the model: a step gives the same logits with a fusion on and off.

``rotary_kv`` (the rotary applied by the attention's cache write, `PagedAttention.fuses_rotary`):
on the CPU the model keeps the separate references, so the CPU tests force the fused path onto the
fused reference, which must change nothing, not a bit. The GPU tests (``python -m pytest -m gpu
tests/test_fusions.py``) switch fusions off through ``FASTGEN_FUSIONS_OFF``, as benchmarks do.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from fastgen.kernels import _dispatch

from fastgen import EngineConfig, kernels
from fastgen.layers.attention import PagedAttention
from fastgen.models.config import ModelConfig
from fastgen.plan import SamplingOptions, SequenceChunk, SequenceStart, StepPlan
from fastgen.runner import ModelRunner
from tests.helpers import engine_greedy
from tests.models.test_hf_parity import CASES, prompts_of_mixed_lengths

GREEDY = SamplingOptions(
    temperature=0.0, top_k=0, top_p=1.0, seed=None, min_new_tokens=0, suppressed_token_ids=[]
)
FUSIONS = ["rotary_kv"]  # names FASTGEN_FUSIONS_OFF takes
ROTARY_CASES = {
    name: CASES[name]
    for name in [
        "llama-gqa-llama3-rope",
        "llama-mha",
        "phi-parallel-block-partial-rotary",
        "qwen3-qk-norm-head-dim",  # q/k norms before the rotary: q and k are no views of the QKV output
    ]
}
LOGN_CASE = "qwen-v1-logn"  # log-length query scaling after the rotary: the fusion stays off
ROTARY_CASES[LOGN_CASE] = ("qwen", dict(use_logn_attn=True))


def mixed_plans(num_mixed: int = 8, num_decode_only: int = 3, seed: int = 0) -> list[StepPlan]:
    """Steps of decodes followed by a new prompt chunk (a prompt alone first), 8 blocks a sequence,
    then steps of decodes alone (what decode graphs replay)."""
    rng = random.Random(seed)
    plans, position = [], {}
    for step in range(num_mixed + num_decode_only):
        chunks = [SequenceChunk(seq, [rng.randrange(3, 300)], position[seq], [], True) for seq in position]
        started = []
        if step < num_mixed:
            prompt = [rng.randrange(3, 300) for _ in range(rng.choice([1, 5, 17, 40]))]
            chunks.append(SequenceChunk(step, prompt, 0, list(range(step * 8, step * 8 + 8)), True))
            started.append(SequenceStart(step, GREEDY, 0))
        plans.append(StepPlan(step, [], started, chunks))
        for chunk in chunks:
            position[chunk.seq_id] = chunk.start_position + len(chunk.token_ids)
    return plans


def step_logits(path: str, plans: list[StepPlan], **config) -> list[torch.Tensor]:
    """The logits each step of ``plans`` samples from, run by a fresh runner."""
    model_config = ModelConfig.from_pretrained(path)
    runner = ModelRunner(path, EngineConfig(num_kv_blocks=80, block_size=16, **config), model_config, 256,
                         show_progress=False)
    logits = []
    sample = runner._sample

    def spy(step_logits, states):  # decode graphs compute logits inside the graph: watch them here
        logits.append(step_logits.float().cpu())
        return sample(step_logits, states)

    runner._sample = spy
    for plan in plans:
        runner.execute(plan)
    assert len(logits) == len(plans)
    return logits


@pytest.fixture
def count_fused_calls(monkeypatch) -> list[int]:
    """Counts the calls of ``kernels.rotary_and_write_kv_cache`` (a one-element list)."""
    calls = [0]
    fused = kernels.rotary_and_write_kv_cache

    def counting(*args):
        calls[0] += 1
        return fused(*args)

    monkeypatch.setattr(kernels, "rotary_and_write_kv_cache", counting)
    return calls


@pytest.mark.parametrize("case", ROTARY_CASES)
def test_cpu_forced_rotary_kv_changes_no_logit(toy_checkpoint, case, monkeypatch, count_fused_calls):
    family, overrides = ROTARY_CASES[case]
    path = toy_checkpoint(family, **overrides)
    plans = mixed_plans()
    unfused = step_logits(path, plans, dtype="float32", device="cpu")
    assert count_fused_calls[0] == 0, "the CPU keeps the separate references"
    monkeypatch.setattr(PagedAttention, "fuses_rotary", staticmethod(lambda q: True))
    fused = step_logits(path, plans, dtype="float32", device="cpu")
    if case == LOGN_CASE:
        assert ModelConfig.from_pretrained(path).logn_base_length
        assert count_fused_calls[0] == 0, "queries scaled after the rotary: no fusion"
    else:
        num_layers = ModelConfig.from_pretrained(path).num_layers
        assert count_fused_calls[0] == num_layers * len(plans)  # no graphs on the CPU
    for step, (got, want) in enumerate(zip(fused, unfused, strict=True)):
        assert torch.equal(got, want), f"step {step}: max difference {(got - want).abs().max()}"


def test_fuses_rotary_only_with_triton_kernels_and_the_fusion_on(fusions_off, monkeypatch):
    def on_cuda(rows: int) -> SimpleNamespace:
        return SimpleNamespace(is_cuda=True, shape=(rows, 4, 64))  # all fuses_rotary asks of the query

    assert not PagedAttention.fuses_rotary(torch.zeros(1, 4, 64))  # CPU tensors take the references
    fusions_off("")
    assert PagedAttention.fuses_rotary(on_cuda(1)) and PagedAttention.fuses_rotary(on_cuda(8))
    fusions_off("silu_down, rotary_kv")
    assert not PagedAttention.fuses_rotary(on_cuda(1))
    fusions_off("all")
    assert not PagedAttention.fuses_rotary(on_cuda(1))
    # unset: the measured default, one-row steps only
    monkeypatch.delenv("FASTGEN_FUSIONS_OFF")
    _dispatch._fusions_off.cache_clear()
    assert PagedAttention.fuses_rotary(on_cuda(1)) and not PagedAttention.fuses_rotary(on_cuda(2))


def test_every_fusion_serves_one_row_steps_by_default(monkeypatch):
    monkeypatch.delenv("FASTGEN_FUSIONS_OFF", raising=False)
    _dispatch._fusions_off.cache_clear()
    try:
        for name in ("rotary_kv", "gated_down", "norm_linear", "qkv_rotary"):
            assert kernels.fusion_enabled(name, 1) and not kernels.fusion_enabled(name, 2)
        monkeypatch.setenv("FASTGEN_FUSIONS_OFF", "norm_linear")
        _dispatch._fusions_off.cache_clear()
        assert kernels.fusion_enabled("gated_down", 8) and not kernels.fusion_enabled("norm_linear", 1)
    finally:
        _dispatch._fusions_off.cache_clear()


# ---- GPU ----


GPU_RUNS = [(case, "auto", True) for case in ROTARY_CASES] + [
    ("llama-gqa-llama3-rope", "fp8", True),
    ("phi-parallel-block-partial-rotary", "fp8", True),
    ("llama-gqa-llama3-rope", "auto", False),
    ("phi-parallel-block-partial-rotary", "auto", False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "kv_cache_dtype", "cuda_graphs"), GPU_RUNS)
def test_gpu_rotary_kv_changes_no_logit(toy_checkpoint, case, kv_cache_dtype, cuda_graphs, fusions_off,
                                        count_fused_calls):
    """bfloat16 steps (decode graphs and piecewise graphs of mixed steps, or eager) give the same
    logits, to the bit, with the rotary fused into the cache write and without."""
    family, overrides = ROTARY_CASES[case]
    path = toy_checkpoint(family, **overrides)
    plans = mixed_plans()
    config = dict(dtype="bfloat16", device="cuda", kv_cache_dtype=kv_cache_dtype, cuda_graphs=cuda_graphs,
                  token_budget=64, max_seqs=16)
    fusions_off("rotary_kv,qkv_rotary")  # qkv_rotary would write decode rows' caches itself
    unfused = step_logits(path, plans, **config)
    assert count_fused_calls[0] == 0
    fusions_off("qkv_rotary")
    fused = step_logits(path, plans, **config)
    assert (count_fused_calls[0] == 0) == (case == LOGN_CASE)
    for step, (got, want) in enumerate(zip(fused, unfused, strict=True)):
        assert torch.equal(got, want), f"step {step}: max difference {(got - want).abs().max()}"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope"])
def test_gpu_greedy_tokens_equal_with_fusion_on_and_off(toy_checkpoint, case, fusion, cuda_graphs,
                                                         fusions_off):
    family, overrides = CASES[case]
    path = toy_checkpoint(family, **overrides)
    prompts = prompts_of_mixed_lengths(384)
    tokens = {}
    for names in (fusion, ""):
        fusions_off(names)
        tokens[names] = engine_greedy(path, prompts, 24, token_budget=16, device="cuda",
                                      cuda_graphs=cuda_graphs, kv_cache_bytes=1 << 28)
    assert tokens[""] == tokens[fusion]
