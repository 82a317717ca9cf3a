"""Falcon: configs as published (the ``falcon`` type and the older ``RefinedWeb`` /
``RefinedWebModel`` ones), the fused ``query_key_value`` layouts, what is refused, and that what
makes Falcon Falcon changes the output. Greedy parity with HF for each layout is in
test_hf_parity.py (CASES ``falcon-*``), tensor parallelism in tests/test_tensor_parallel.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fastgen.errors import UnsupportedModelError
from fastgen.models.config import ModelConfig
from tests.helpers import engine_greedy, hf_greedy
from tests.models.test_hf_parity import prompts_of_mixed_lengths

# tiiuae/falcon-7b before transformers had a Falcon class (configuration_RW.py)
FALCON_7B_REFINEDWEBMODEL = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "RefinedWebModel", "multi_query": True, "n_head": 71, "n_layer": 32, "parallel_attn": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024,
}  # fmt: skip
# tiiuae/falcon-40b, RefinedWeb (its type implies the new decoder)
FALCON_40B_REFINEDWEB = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 8192, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "RefinedWeb",
    "n_head": 128, "n_head_kv": 8, "n_layer": 60, "parallel_attn": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024,
}  # fmt: skip
# tiiuae/falcon-180B
FALCON_180B = {
    "alibi": False, "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False,
    "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 14848,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 2048,
    "model_type": "falcon", "multi_query": True, "new_decoder_architecture": True, "num_attention_heads": 232,
    "num_hidden_layers": 80, "num_kv_heads": 8, "parallel_attn": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.32.0", "use_cache": True, "vocab_size": 65024,
}  # fmt: skip
# tiiuae/falcon-rw-1b: ALiBi, no rotary
FALCON_RW_1B = {
    "alibi": True, "architectures": ["FalconForCausalLM"], "bias": True, "hidden_size": 2048,
    "model_type": "falcon", "multi_query": False, "new_decoder_architecture": False,
    "num_attention_heads": 32, "num_hidden_layers": 24, "parallel_attn": False, "vocab_size": 50304,
}  # fmt: skip


def test_published_configs():
    seven = ModelConfig.from_dict(FALCON_7B_REFINEDWEBMODEL)
    shape = (seven.hidden_size, seven.num_layers, seven.num_heads, seven.num_kv_heads, seven.head_dim)
    assert shape == (4544, 32, 71, 1, 64) and seven.intermediate_size == 4 * 4544
    assert (seven.block, seven.parallel_norms, seven.norm, seven.gated_mlp) == ("parallel", 1, "layer", False)
    assert (seven.hidden_act, seven.qkv_bias, seven.mlp_bias) == ("gelu", False, False)
    assert seven.tie_word_embeddings
    assert (seven.eos_token_ids, seven.rope_theta, seven.max_position_embeddings) == ((11,), 10000.0, 2048)
    forty = ModelConfig.from_dict(FALCON_40B_REFINEDWEB)
    assert (forty.num_layers, forty.num_heads, forty.num_kv_heads, forty.head_dim) == (60, 128, 8, 64)
    assert (forty.block, forty.parallel_norms) == ("parallel", 2)
    big = ModelConfig.from_dict(FALCON_180B)
    assert (big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim) == (80, 232, 8, 64)
    assert big.parallel_norms == 2
    # the 40B config as transformers' Falcon class spells it reads the same
    ported = {k: v for k, v in FALCON_40B_REFINEDWEB.items() if not k.startswith("n_")}
    ported.update(model_type="falcon", num_attention_heads=128, num_kv_heads=8, num_hidden_layers=60)
    ported["new_decoder_architecture"] = True
    assert _options(ModelConfig.from_dict(ported)) == _options(forty)


def _options(config: ModelConfig) -> dict:
    return {name: value for name, value in vars(config).items() if name not in ("raw", "model_type")}


def test_alibi_and_unbuildable_layouts_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"alibi=true.*no position bias"):
        ModelConfig.from_dict(FALCON_RW_1B)
    with pytest.raises(UnsupportedModelError, match="new decoder without parallel_attn"):
        ModelConfig.from_dict({**FALCON_180B, "parallel_attn": False})


def _rewritten(source: str, dest: Path, config: dict) -> str:
    shutil.copytree(source, dest)
    (dest / "config.json").write_text(json.dumps(config))
    return str(dest)


@pytest.mark.parametrize("layout", ["RefinedWebModel", "RefinedWeb"])
def test_refinedweb_configs_load_the_same_checkpoints(toy_checkpoint, tmp_path, layout):
    """The same weights under the older config layout (names n_head, n_head_kv, n_layer; the 40B
    decoder implied by the type) give HF Falcon's greedy output."""
    new_decoder = layout == "RefinedWeb"
    overrides = dict(new_decoder_architecture=True, num_kv_heads=2) if new_decoder else {}
    path = toy_checkpoint("falcon", **overrides)
    falcon = json.loads(Path(path, "config.json").read_text())
    renamed = ("num_attention_heads", "num_hidden_layers", "num_kv_heads")
    old = {k: v for k, v in falcon.items() if k not in renamed}
    old.update(model_type=layout, n_head=falcon["num_attention_heads"], n_layer=falcon["num_hidden_layers"])
    old.pop("new_decoder_architecture")
    if new_decoder:
        old["n_head_kv"] = 2
    rewritten = _rewritten(path, tmp_path / layout, old)
    assert ModelConfig.from_pretrained(rewritten).num_kv_heads == (2 if new_decoder else 1)
    prompts = prompts_of_mixed_lengths(384, seed=2)[:4]
    assert engine_greedy(rewritten, prompts, 12, token_budget=16) == hf_greedy(path, prompts, 12)


def test_the_mlp_norm_of_the_new_decoder_matters(toy_checkpoint, tmp_path):
    """ln_mlp normalizes the MLP's input apart from ln_attn: a copy whose ln_mlp is ln_attn's
    answers differently (and equals HF on that copy too)."""
    from safetensors.torch import load_file, save_file

    path = toy_checkpoint("falcon", new_decoder_architecture=True, num_kv_heads=2)
    copy = tmp_path / "same-norms"
    shutil.copytree(path, copy)
    weights = load_file(str(copy / "model.safetensors"))
    for name in [name for name in weights if ".ln_mlp." in name]:
        weights[name] = weights[name.replace(".ln_mlp.", ".ln_attn.")].clone()
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    prompts = prompts_of_mixed_lengths(384)[2:4]
    same = engine_greedy(str(copy), prompts, 12, token_budget=16)
    assert same == hf_greedy(str(copy), prompts, 12)
    assert same != engine_greedy(path, prompts, 12, token_budget=16)


def test_parallel_attention_matters(toy_checkpoint):
    prompts = prompts_of_mixed_lengths(384)[2:4]
    parallel = engine_greedy(toy_checkpoint("falcon", bias=True), prompts, 12)
    assert parallel != engine_greedy(toy_checkpoint("falcon", bias=True, parallel_attn=False), prompts, 12)


def test_bin_checkpoint_of_the_grouped_layout(toy_checkpoint):
    path = toy_checkpoint("falcon", new_decoder_architecture=True, num_kv_heads=2, weights_format="bin")
    assert not list(Path(path).glob("*.safetensors"))
    prompts = prompts_of_mixed_lengths(384, seed=3)[:3]
    assert engine_greedy(path, prompts, 12, token_budget=16) == hf_greedy(path, prompts, 12)
