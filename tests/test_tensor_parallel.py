"""Tensor parallelism on the CPU (gloo): Megatron shards reassemble the checkpoint, and greedy
outputs with 2 and 4 worker processes equal one process and HF transformers, for multi-head,
grouped-query and multi-query attention (KV heads replicated when fewer than ranks). Dummy
weights are the same model at every tensor-parallel size."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgen import SamplingParams
from fastgen.layers.parallel import TensorParallel
from fastgen.models.config import ModelConfig
from fastgen.models.loader import build_model
from tests.helpers import engine_greedy, generate_together, hf_greedy
from tests.models.test_hf_parity import hf_reference

NEW_TOKENS = 8


def full_checkpoint(path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize(("num_kv_heads", "size"), [(4, 2), (2, 4), (1, 4)])
def test_shards_reassemble_the_checkpoint(toy_checkpoint, num_kv_heads, size):
    path = toy_checkpoint("llama", num_key_value_heads=num_kv_heads, vocab_size=390)
    config = ModelConfig.from_pretrained(path)
    full = full_checkpoint(path)
    ranks = [
        build_model(
            path,
            config,
            dtype=torch.float32,
            device=torch.device("cpu"),
            tp=TensorParallel(rank, size),
            max_model_len=64,
        )
        for rank in range(size)
    ]
    prefix = "model.layers.0."
    head_dim = config.head_dim
    q_parts, k_parts, o_parts, gate_parts, down_parts, vocab_parts = [], [], [], [], [], []
    for rank, model in enumerate(ranks):
        layer = model.model.layers[0]
        qkv = layer.self_attn.qkv_proj
        q, k, v = qkv.weight.split([qkv.q_size, qkv.kv_size, qkv.kv_size])
        q_parts.append(q)
        k_parts.append(k)
        kv_heads_per_rank = max(1, num_kv_heads // size)
        first_kv_head = rank * num_kv_heads // size  # replicated when fewer KV heads than ranks
        rows = slice(first_kv_head * head_dim, (first_kv_head + kv_heads_per_rank) * head_dim)
        assert torch.equal(v, full[prefix + "self_attn.v_proj.weight"][rows])
        o_parts.append(layer.self_attn.o_proj.weight)
        gate, _ = layer.mlp.gate_up_proj.weight.chunk(2)
        gate_parts.append(gate)
        down_parts.append(layer.mlp.down_proj.weight)
        vocab_parts.append(model.model.embed_tokens.weight)
    assert torch.equal(torch.cat(q_parts), full[prefix + "self_attn.q_proj.weight"])
    if num_kv_heads >= size:
        assert torch.equal(torch.cat(k_parts), full[prefix + "self_attn.k_proj.weight"])
    else:  # each KV head lives on size / num_kv_heads consecutive ranks
        replicas = size // num_kv_heads
        assert torch.equal(torch.cat(k_parts[::replicas]), full[prefix + "self_attn.k_proj.weight"])
        assert all(torch.equal(k_parts[r], k_parts[r - r % replicas]) for r in range(size))
    assert torch.equal(torch.cat(o_parts, dim=1), full[prefix + "self_attn.o_proj.weight"])
    assert torch.equal(torch.cat(gate_parts), full[prefix + "mlp.gate_proj.weight"])
    assert torch.equal(torch.cat(down_parts, dim=1), full[prefix + "mlp.down_proj.weight"])
    vocab = torch.cat(vocab_parts)  # the last shard is padded with zero rows
    assert torch.equal(vocab[: config.vocab_size], full["model.embed_tokens.weight"])
    assert not vocab[config.vocab_size :].any()


FALCON_LAYOUTS = {  # toy overrides -> how HF's Falcon reads q, k, v out of query_key_value
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2),  # per KV head: queries, key, value
    "multi-query": {},  # all queries, one key, one value
    "interleaved": dict(multi_query=False, parallel_attn=False),  # q, k, v of each head in turn
}


def _falcon_q_k_v(fused: torch.Tensor, layout: str, heads: int, kv_heads: int, dim: int):
    if layout == "grouped":
        groups = fused.view(kv_heads, heads // kv_heads + 2, dim, -1)
        return groups[:, :-2].flatten(0, 2), groups[:, -2].flatten(0, 1), groups[:, -1].flatten(0, 1)
    if layout == "multi-query":
        return fused.split([heads * dim, dim, dim])
    per_head = fused.view(heads, 3, dim, -1)
    return per_head[:, 0].flatten(0, 1), per_head[:, 1].flatten(0, 1), per_head[:, 2].flatten(0, 1)


@pytest.mark.parametrize("layout", list(FALCON_LAYOUTS))
def test_falcon_fused_qkv_shards_are_the_heads_of_each_rank(toy_checkpoint, layout):
    """Falcon's query_key_value is cut so that each rank holds its query heads and the KV heads
    they read (replicated when fewer than ranks), each read from the fused tensor."""
    path = toy_checkpoint("falcon", **FALCON_LAYOUTS[layout])
    config = ModelConfig.from_pretrained(path)
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    fused = full_checkpoint(path)["transformer.h.1.self_attention.query_key_value.weight"]
    q, k, v = _falcon_q_k_v(fused, layout, heads, kv_heads, dim)
    for size in (2, 4):
        for rank in range(size):
            model = build_model(
                path, config, dtype=torch.float32, device=torch.device("cpu"), tp=TensorParallel(rank, size),
                max_model_len=64,
            )  # fmt: skip
            qkv = model.model.layers[1].self_attn.qkv_proj
            mine_q, mine_k, mine_v = qkv.weight.split([qkv.q_size, qkv.kv_size, qkv.kv_size])
            rows = heads // size * dim
            assert torch.equal(mine_q, q[rank * rows : (rank + 1) * rows])
            local = max(1, kv_heads // size)
            first = rank * local if kv_heads >= size else rank * kv_heads // size
            kv_rows = slice(first * dim, (first + local) * dim)
            assert torch.equal(mine_k, k[kv_rows]) and torch.equal(mine_v, v[kv_rows]), (layout, size, rank)


def prompts_of_mixed_lengths(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in (1, 7, 40, 130, 3, 75)]


CASES = {
    "mha-tp2": ({}, 2),
    "mha-tp4": ({}, 4),
    "gqa-tp2": ({"num_key_value_heads": 2}, 2),
    "gqa-fewer-kv-heads-than-ranks-tp4": ({"num_key_value_heads": 2}, 4),
    "mqa-tied-padded-vocab-tp4": (
        {"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 390},
        4,
    ),
    "mha-biases-tp2": ({"attention_bias": True, "mlp_bias": True}, 2),
    "qwen3-qk-norm-gqa-tp2": ({"family": "qwen3"}, 2),
    "phi-biases-lm-head-bias-tp2": ({"family": "phi"}, 2),
    "mixtral-experts-split-tp2": ({"family": "mixtral"}, 2),
    "gemma-mqa-scaled-embeddings-tp2": ({"family": "gemma"}, 2),
    "gemma2-softcaps-tp2": ({"family": "gemma2"}, 2),
    "gemma3-text-tp2": ({"family": "gemma3_text"}, 2),
    "falcon-40b-grouped-kv-fused-qkv-tp2": (
        {"family": "falcon", "new_decoder_architecture": True, "num_kv_heads": 2},
        2,
    ),
    "opt-350m-post-norm-projections-tp2": (
        dict(family="opt", do_layer_norm_before=False, word_embed_proj_dim=32, tie_word_embeddings=True),
        2,
    ),
    "qwen-v1-fused-c-attn-tp2": ({"family": "qwen"}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_one_process_and_hf(toy_checkpoint, case):
    overrides, size = CASES[case]
    overrides = dict(overrides)
    family = overrides.pop("family", "llama")
    path = toy_checkpoint(family, **overrides)
    prompts = prompts_of_mixed_lengths()
    expected = hf_greedy(hf_reference(path, family), prompts, NEW_TOKENS)
    single = engine_greedy(path, prompts, NEW_TOKENS, token_budget=16, executor="inprocess")
    sharded = engine_greedy(
        path, prompts, NEW_TOKENS, token_budget=16, tensor_parallel=size, worker_start_timeout_s=120
    )
    assert single == expected
    for prompt, want, have in zip(prompts, expected, sharded):
        assert have == want, f"tensor_parallel={size}: prompt of {len(prompt)} tokens diverged"


def test_dummy_weight_shards_reassemble_the_unsharded_dummy_weights():
    config = ModelConfig.from_dict(
        dict(
            model_type="llama",
            vocab_size=390,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )

    def dummy(rank: int, size: int, seed: int = 3):
        options = dict(dtype=torch.float32, device=torch.device("cpu"), max_model_len=64, load_format="dummy")
        return build_model(None, config, tp=TensorParallel(rank, size), seed=seed, **options)

    full, ranks = dummy(0, 1), [dummy(rank, 4) for rank in range(4)]
    layer, layers = full.model.layers[0], [model.model.layers[0] for model in ranks]
    qkv = layer.self_attn.qkv_proj
    q, k, _ = qkv.weight.split([qkv.q_size, qkv.kv_size, qkv.kv_size])
    assert torch.equal(torch.cat([part.self_attn.qkv_proj.weight[: qkv.q_size // 4] for part in layers]), q)
    for rank, part in enumerate(layers):  # 2 KV heads on 4 ranks: each head on 2 ranks
        kv_rows = slice(qkv.q_size // 4, qkv.q_size // 4 + qkv.kv_size // 2)
        head = rank // 2
        assert torch.equal(part.self_attn.qkv_proj.weight[kv_rows], k.chunk(2)[head])
    assert torch.equal(torch.cat([p.mlp.down_proj.weight for p in layers], dim=1), layer.mlp.down_proj.weight)
    gate_up = torch.cat([torch.stack(p.mlp.gate_up_proj.weight.chunk(2)) for p in layers], dim=1)
    assert torch.equal(gate_up.flatten(0, 1), layer.mlp.gate_up_proj.weight)
    vocab = torch.cat([model.lm_head.weight for model in ranks])
    assert torch.equal(vocab[: config.vocab_size], full.lm_head.weight)
    assert not vocab[config.vocab_size :].any()  # the padding of the last shard
    assert torch.equal(layers[1].input_layernorm.weight, torch.ones(64))
    assert 0.015 < layer.mlp.down_proj.weight.std() < 0.025
    assert not torch.equal(dummy(0, 1, seed=4).lm_head.weight, full.lm_head.weight)


def test_dummy_expert_shards_reassemble_the_unsharded_experts():
    config = ModelConfig.from_dict(
        dict(
            model_type="mixtral",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_local_experts=3,
            num_experts_per_tok=2,
        )
    )
    options = dict(dtype=torch.float32, device=torch.device("cpu"), max_model_len=64, load_format="dummy")
    layouts = ((0, 1), (0, 2), (1, 2))  # (rank, size)
    full, *ranks = (build_model(None, config, tp=TensorParallel(*layout), **options) for layout in layouts)
    moe, parts = full.model.layers[0].block_sparse_moe, [m.model.layers[0].block_sparse_moe for m in ranks]
    assert torch.equal(torch.cat([part.w2 for part in parts], dim=2), moe.w2)
    for which in range(2):  # gate (w1), then up (w3): each rank holds its half of each
        halves = [part.w13[:, which * 24 : (which + 1) * 24] for part in parts]
        assert torch.equal(torch.cat(halves, dim=1), moe.w13[:, which * 48 : (which + 1) * 48])
    assert torch.equal(parts[1].gate.weight, moe.gate.weight)  # the router is replicated
    assert len({float(moe.w13[e].std()) for e in range(3)}) == 3  # experts drawn independently


def test_dummy_weights_greedy_tp2_matches_tp1(toy_checkpoint):
    # one KV head on two ranks (replicated), tied embeddings
    path = toy_checkpoint("llama", num_key_value_heads=1, tie_word_embeddings=True, vocab_size=390)
    prompts = prompts_of_mixed_lengths()[:4]
    options = dict(token_budget=16, load_format="dummy", seed=5)
    single = engine_greedy(path, prompts, NEW_TOKENS, executor="inprocess", **options)
    sharded = engine_greedy(path, prompts, NEW_TOKENS, tensor_parallel=2, **options)
    assert sharded == single
    assert len({token for output in single for token in output}) > 1  # not a degenerate model


def test_logprobs_tp2_equal_tp1(toy_checkpoint):
    # an odd vocabulary: the last rank's LM-head shard is padded, and the padding is no token
    path = toy_checkpoint("llama", vocab_size=391)
    prompts = prompts_of_mixed_lengths()[:3]
    requests = [
        (prompt, SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=n))
        for prompt, n in zip(prompts, [None, 0, 5])
    ]
    single = generate_together(path, requests, token_budget=16, executor="inprocess")
    sharded = generate_together(path, requests, token_budget=16, tensor_parallel=2)
    assert [out.token_ids for out in sharded] == [out.token_ids for out in single]
    assert single[0].logprobs is None and sharded[0].logprobs is None
    for one, two in zip(single[1:], sharded[1:]):
        assert len(two.logprobs) == len(one.logprobs) == len(one.token_ids)
        for a, b in zip(one.logprobs, two.logprobs):
            assert b.token_id == a.token_id and b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert list(b.top) == list(a.top)
            assert list(b.top.values()) == pytest.approx(list(a.top.values()), abs=1e-4)
            assert b.text == a.text and b.text_offset == a.text_offset


def test_penalties_tp2_equal_tp1(toy_checkpoint):
    path = toy_checkpoint("llama", vocab_size=391)
    prompts = prompts_of_mixed_lengths()[:4]
    base = dict(max_new_tokens=10, ignore_eos=True)
    sampled = dict(base, do_sample=True, temperature=0.9, seed=4)
    options = [
        dict(base),
        dict(base, repetition_penalty=1.4, logit_bias={7: 2.0}),
        dict(sampled, presence_penalty=0.8, frequency_penalty=0.5),
        dict(base, frequency_penalty=1.0, logprobs=1),
    ]
    requests = [(prompt, SamplingParams(**o)) for prompt, o in zip(prompts, options)]
    single = generate_together(path, requests, token_budget=16, executor="inprocess")
    sharded = generate_together(path, requests, token_budget=16, tensor_parallel=2)
    assert [out.token_ids for out in sharded] == [out.token_ids for out in single]
