"""OPT: configs as published (125m, 350m, 66b), the learned positions' offset of 2, checkpoints
saved with or without the ``model.`` prefix, what is refused. Greedy parity with HF (pre-norm;
OPT-350m's post-norm with projections) is in test_hf_parity.py, tensor parallelism in
tests/test_tensor_parallel.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fastgen.errors import UnsupportedModelError
from fastgen.models.config import ModelConfig
from tests.helpers import engine_greedy, hf_greedy
from tests.models.test_hf_parity import prompts_of_mixed_lengths

OPT_125M = {
    "_name_or_path": "facebook/opt-125m", "_remove_final_layer_norm": False, "activation_dropout": 0.0,
    "activation_function": "relu", "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0,
    "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 3072,
    "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
    "model_type": "opt", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": True,
    "vocab_size": 50272, "word_embed_proj_dim": 768,
}  # fmt: skip
OPT_350M = {
    "_name_or_path": "facebook/opt-350m", "activation_dropout": 0.0, "activation_function": "relu",
    "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
    "do_layer_norm_before": False, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 4096, "hidden_size": 1024,
    "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt",
    "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 1, "prefix": "</s>",
    "torch_dtype": "float16", "transformers_version": "4.20.0.dev0", "use_cache": True, "vocab_size": 50272,
    "word_embed_proj_dim": 512,
}  # fmt: skip
OPT_66B = {
    "_name_or_path": "facebook/opt-66b", "_remove_final_layer_norm": False, "activation_dropout": 0.0,
    "activation_function": "relu", "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0,
    "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 36864,
    "hidden_size": 9216, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
    "model_type": "opt", "num_attention_heads": 72, "num_hidden_layers": 64, "output_projection": True,
    "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0.dev0",
    "use_cache": True, "vocab_size": 50272, "word_embed_proj_dim": 9216,
}  # fmt: skip


def test_published_configs():
    small = ModelConfig.from_dict(OPT_125M)
    assert (small.hidden_size, small.num_layers, small.num_heads, small.head_dim) == (768, 12, 12, 64)
    assert (small.intermediate_size, small.hidden_act, small.gated_mlp) == (3072, "relu", False)
    assert small.norm == "layer"
    assert (small.block, small.final_norm, small.embedding_dim, small.learned_position_offset) == (
        "sequential", True, None, 2,
    )  # fmt: skip
    assert small.rotary_dim == 0 and small.qkv_bias and small.o_proj_bias and small.mlp_bias
    assert small.tie_word_embeddings and small.eos_token_ids == (2,) and small.norm_eps == 1e-5
    post = ModelConfig.from_dict(OPT_350M)
    assert (post.block, post.final_norm, post.embedding_dim) == ("post_norm", False, 512)
    assert post.hidden_size == 1024
    big = ModelConfig.from_dict(OPT_66B)
    assert (big.num_layers, big.num_heads, big.head_dim, big.intermediate_size) == (64, 72, 128, 36864)


def test_settings_without_an_implementation_are_refused():
    with pytest.raises(UnsupportedModelError, match="layer_norm_elementwise_affine"):
        ModelConfig.from_dict({**OPT_125M, "layer_norm_elementwise_affine": False})


def test_positions_are_read_two_rows_into_the_table(toy_checkpoint, tmp_path):
    """Position p reads row p + 2: the first two rows are never read (changing them changes
    nothing), the third is position 0's (changing it changes the output)."""
    from safetensors.torch import load_file, save_file

    path = toy_checkpoint("opt")
    prompts = prompts_of_mixed_lengths(384)[2:3]
    reference = engine_greedy(path, prompts, 8, token_budget=16)
    outputs = {}
    for rows in ((0, 1), (2,)):
        copy = tmp_path / f"rows-{rows}"
        shutil.copytree(path, copy)
        weights = load_file(str(copy / "model.safetensors"))
        weights["model.decoder.embed_positions.weight"][list(rows)] = 3.0
        save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
        outputs[rows] = engine_greedy(str(copy), prompts, 8, token_budget=16)
    assert outputs[(0, 1)] == reference and outputs[(2,)] != reference


def test_checkpoints_saved_without_the_model_prefix(toy_checkpoint, tmp_path):
    """Some OPT checkpoints (saved from OPTModel) name their tensors ``decoder.*`` and leave the
    tied LM head out; they load the same."""
    import torch
    from safetensors.torch import load_file

    path = toy_checkpoint("opt", tie_word_embeddings=True, do_layer_norm_before=False, word_embed_proj_dim=32)
    copy = tmp_path / "decoder-names"
    shutil.copytree(path, copy)
    (copy / "model.safetensors").unlink()
    weights = load_file(str(Path(path) / "model.safetensors"))
    renamed = {name.removeprefix("model."): t for name, t in weights.items() if name != "lm_head.weight"}
    assert all(name.startswith("decoder.") for name in renamed)
    torch.save(renamed, copy / "pytorch_model.bin")
    prompts = prompts_of_mixed_lengths(384, seed=4)[:3]
    assert engine_greedy(str(copy), prompts, 12, token_budget=16) == hf_greedy(path, prompts, 12)
