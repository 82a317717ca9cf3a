"""FP8 weights (``quantization="fp8"``): the row-wise quantization, the W8A8 product against the
dequantized product, and a quantized engine's predictions against the model-dtype engine's
(teacher-forced, on a briefly trained toy model whose predictions are not near-ties)."""

from __future__ import annotations

import pytest
import torch

from fastgen import EngineConfig, SamplingParams
from fastgen.layers.quantization import FP8, fp8_linear, quantize_rows
from tests.helpers import generate_together


def test_rows_are_scaled_to_the_fp8_range():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1.0])[:, None]
    x[3] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (6, 1)
    assert torch.equal(q[3].float(), torch.zeros(64))  # an all-zero row stays zero
    restored = q.float() * scale
    assert torch.allclose(restored, x, rtol=0.07, atol=1e-12)  # e4m3 keeps 3 mantissa bits
    assert (q.float().abs().amax(dim=1)[[0, 1, 2]] == 448).all()  # each row uses the whole range


def test_fp8_linear_is_the_product_of_the_dequantized_operands():
    torch.manual_seed(1)
    x, weight, bias = torch.randn(5, 96), torch.randn(40, 96) * 0.1, torch.randn(40)
    weight_q, weight_scale = quantize_rows(weight)
    x_q, x_scale = quantize_rows(x)
    expected = (x_q.float() * x_scale) @ (weight_q.float() * weight_scale).t() + bias
    actual = fp8_linear(x, weight_q, weight_scale, bias)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(actual, x @ weight.t() + bias, rtol=0.1, atol=0.1)  # and near the exact one
    batched = fp8_linear(x.reshape(5, 1, 96), weight_q, weight_scale, bias)
    torch.testing.assert_close(batched.reshape(5, 40), actual)


def test_shapes_the_fp8_gemm_cannot_take_are_refused_by_name():
    from torch import nn

    from fastgen.layers.linear import ColumnParallelLinear
    from fastgen.layers.quantization import quantize_linear_layers

    model = nn.Sequential(ColumnParallelLinear(64, [40]))
    with pytest.raises(ValueError, match="0 is 40 x 64"):
        quantize_linear_layers(model, (ColumnParallelLinear,))


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")


@pytest.fixture(scope="module")
def trained_path(toy_checkpoint):
    # on the GPU machine the training runs there: on its CPU, under parallel test workers, it took
    # ~100 s of the GPU session
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return toy_checkpoint("llama", train_steps=200, seed=3, train_device=device)


def test_fp8_engine_predicts_like_the_float32_engine(trained_path):
    text = "the engine schedules decodes first and then fills the budget with chunks of prompts " * 3
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=1)

    def scored(**config) -> list:
        (out,) = generate_together(trained_path, [(text, params)], **config)
        return out.prompt_logprobs[1:]

    full, fp8 = scored(), scored(quantization="fp8")
    assert len(full) == len(fp8) > 50
    top = [(next(iter(a.top)), next(iter(b.top))) for a, b in zip(full, fp8)]
    agreement = sum(x == y for x, y in top) / len(top)
    assert agreement >= 0.9, agreement  # the same predictions, up to near-ties
    confident = [(a.logprob, b.logprob) for a, b in zip(full, fp8) if a.logprob > -1.0]
    errors = [abs(x - y) for x, y in confident]  # where the model is sure, FP8 changes little
    assert errors and sum(errors) / len(errors) < 0.1 and max(errors) < 0.5
    assert any(a.logprob != b.logprob for a, b in zip(full, fp8))  # the quantized path did run


def test_fp8_kv_cache_predicts_like_the_float32_cache(trained_path):
    """Keys and values stored in float8 e4m3 (``kv_cache_dtype="fp8"``): every attention read,
    prompt chunks included, sees the rounded cache, and the predictions stay the same."""
    text = "decodes go first and prompt chunks fill what is left of the budget " * 3
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=1)
    (full,) = generate_together(trained_path, [(text, params)], token_budget=32)
    (fp8,) = generate_together(trained_path, [(text, params)], token_budget=32, kv_cache_dtype="fp8")
    pairs = list(zip(full.prompt_logprobs[1:], fp8.prompt_logprobs[1:]))
    agreement = sum(next(iter(a.top)) == next(iter(b.top)) for a, b in pairs) / len(pairs)
    assert len(pairs) > 50 and agreement >= 0.9, agreement
    assert any(a.logprob != b.logprob for a, b in pairs)  # the FP8 cache did change the numbers


def test_fp8_kv_cache_holds_more_tokens_in_the_same_bytes(llama_path):
    from fastgen.models.config import ModelConfig
    from fastgen.runner import ModelRunner

    def runner(kv_cache_dtype: str) -> ModelRunner:
        config = EngineConfig(dtype="float32", kv_cache_bytes=1 << 20, kv_cache_dtype=kv_cache_dtype)
        model_config = ModelConfig.from_pretrained(llama_path)
        return ModelRunner(llama_path, config, model_config, 64, show_progress=False)

    full, fp8 = runner("auto"), runner("fp8")
    assert fp8.num_kv_blocks == 4 * full.num_kv_blocks  # one byte an element instead of four
    layer = fp8.attention_layers[0]
    assert layer.key_cache.dtype == layer.value_cache.dtype == FP8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")


def test_fp8_with_tensor_parallelism_predicts_like_one_rank(trained_path):
    """Each rank quantizes its own shard (row-parallel layers: scales over its slice of the input
    features), so tp=2 is not bit-equal to tp=1, but predicts the same; FP8 KV cache on both.
    The same tp=2 run without FP8 weights shows that the ranks did quantize: agreement alone would
    hold if they skipped it."""
    text = "the budget of every step is filled with decodes first " * 4
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=1)
    fp8 = {"quantization": "fp8", "kv_cache_dtype": "fp8"}  # each rank caches its own heads in FP8
    (one,) = generate_together(trained_path, [(text, params)], executor="inprocess", **fp8)
    (two,) = generate_together(trained_path, [(text, params)], tensor_parallel=2, **fp8)
    (unquantized,) = generate_together(
        trained_path, [(text, params)], tensor_parallel=2, kv_cache_dtype="fp8"
    )
    pairs = list(zip(one.prompt_logprobs[1:], two.prompt_logprobs[1:]))
    agreement = sum(next(iter(a.top)) == next(iter(b.top)) for a, b in pairs) / len(pairs)
    assert len(pairs) > 30 and agreement >= 0.9, agreement
    moved = [
        abs(a.logprob - b.logprob) for a, b in zip(two.prompt_logprobs[1:], unquantized.prompt_logprobs[1:])
    ]
    assert max(moved) > 1e-3, max(moved)  # FP8 weights on the ranks change the numbers


def test_fp8_engine_holds_fp8_weights(llama_path):
    from fastgen.models.config import ModelConfig
    from fastgen.runner import ModelRunner

    config = EngineConfig(dtype="float32", quantization="fp8", num_kv_blocks=8)
    runner = ModelRunner(llama_path, config, ModelConfig.from_pretrained(llama_path), 64, show_progress=False)
    layers = runner.model.model.layers
    for weight in (layers[0].self_attn.qkv_proj.weight, layers[1].mlp.down_proj.weight):
        assert weight.dtype == FP8
    assert runner.model.lm_head.weight.dtype == torch.float32  # the LM head keeps the model dtype


@pytest.mark.gpu
def test_fp8_on_the_gpu_in_bfloat16_with_graphs(trained_path):
    """cuBLASLt's FP8 path (row-wise scales, bf16 out) and the FP8 GEMV inside CUDA graphs and
    piecewise graphs, with and without an FP8 KV cache."""
    import asyncio

    from fastgen import AsyncEngine

    text = "the engine schedules decodes first and then fills the budget with chunks of prompts " * 3
    params = SamplingParams(max_new_tokens=16, prompt_logprobs=1, ignore_eos=True)

    async def run(**options):
        # a set cache size: parallel test workers share the GPU
        config = EngineConfig(dtype="bfloat16", device="cuda", kv_cache_bytes=1 << 28, **options)
        async with await AsyncEngine.start(trained_path, config) as engine:
            outs = [out async for out in engine.generate(text, params)]
        return outs[0].prompt_logprobs[1:], [t for out in outs for t in out.token_ids]

    (full, _), (fp8, tokens) = asyncio.run(run()), asyncio.run(run(quantization="fp8"))
    agreement = sum(next(iter(a.top)) == next(iter(b.top)) for a, b in zip(full, fp8)) / len(full)
    assert agreement >= 0.9 and len(tokens) == 16
    # and with the KV cache in FP8 too
    both, tokens = asyncio.run(run(quantization="fp8", kv_cache_dtype="fp8"))
    agreement = sum(next(iter(a.top)) == next(iter(b.top)) for a, b in zip(full, both)) / len(full)
    assert agreement >= 0.9 and len(tokens) == 16
