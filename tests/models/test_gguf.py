"""GGUF checkpoints: tiny toy models written as llama.cpp lays GGUF files out (tests/models/gguf_files.py)
load with the right config and weights, and fastgen's greedy output equals HF transformers' token
for token (float32, CPU). Where the file stores exact float32 weights, the reference is HF on the
original safetensors, which checks names, the rotary row order and the config mapping on their own;
for quantized files it is HF loading the same GGUF (``gguf_file=``), which dequantizes the same way."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fastgen.errors import UnsupportedModelError
from fastgen.models import ModelConfig
from fastgen.models.checkpoint import resolve_model
from fastgen.models.gguf import GGUFIndex, gguf_file_in, iterate_tensors, read_config
from tests.helpers import engine_greedy, hf_greedy
from tests.models.gguf_files import write_gguf
from tests.models.test_hf_parity import prompts_of_mixed_lengths

NEW_TOKENS = 16
LLAMA3_ROPE = dict(
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)

# case -> (toy family, config overrides, GGUF tensor type, reference: HF on the "original" or on the "gguf")
CASES = {
    "llama-gqa-f32": ("llama", dict(num_key_value_heads=2), "F32", "original"),
    "llama-mqa-tied-q8_0": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True), "Q8_0", "gguf"),
    "qwen2-qkv-bias-q4_1": ("qwen2", {}, "Q4_1", "gguf"),
    # llama.cpp writes Mistral as architecture llama; the window comes from attention.sliding_window
    "mistral-sliding-window-f32": ("mistral", dict(sliding_window=24), "F32", "original"),
    # Llama 3.1-style rotary: the file keeps only per-frequency factors (rope_freqs.weight)
    "llama3-rope-factors-f32": ("llama", dict(num_key_value_heads=2, **LLAMA3_ROPE), "F32", "original"),
}


def gguf_checkpoint(toy_checkpoint, tmp_path_factory, family, overrides, tensor_type) -> tuple[str, Path]:
    """(toy HF directory, a directory holding its GGUF file and nothing else)."""
    path = toy_checkpoint(family, **overrides)
    folder = tmp_path_factory.mktemp(f"gguf-{family}-{tensor_type}")
    architecture = "llama" if family == "mistral" else family
    write_gguf(path, folder / "toy.gguf", tensor_type, architecture=architecture)
    return path, folder


def hf_gguf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy outputs, loading the GGUF file (it dequantizes at load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="toy.gguf", dtype=torch.float32
    ).eval()
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(toy_checkpoint, tmp_path_factory, case):
    family, overrides, tensor_type, reference = CASES[case]
    path, folder = gguf_checkpoint(toy_checkpoint, tmp_path_factory, family, overrides, tensor_type)
    prompts = prompts_of_mixed_lengths(384)
    if reference == "original":
        expected = hf_greedy(path, prompts, NEW_TOKENS)
    else:
        expected = hf_gguf_greedy(folder, prompts, NEW_TOKENS)
    # the directory (one .gguf, no config.json) and its tokenizer come from the file's metadata
    got = engine_greedy(str(folder), prompts, NEW_TOKENS, token_budget=16, block_size=16)
    for prompt, want, have in zip(prompts, expected, got):
        assert have == want, f"prompt of {len(prompt)} tokens diverged"


def test_tensor_parallel_ranks_slice_gguf_weights(toy_checkpoint, tmp_path_factory):
    """Two ranks (gloo on CPU) dequantize the file and keep their slices through the same weight
    loaders: the greedy output equals HF's on the same GGUF file."""
    overrides = dict(num_key_value_heads=2)
    _, folder = gguf_checkpoint(toy_checkpoint, tmp_path_factory, "llama", overrides, "Q8_0")
    prompts = prompts_of_mixed_lengths(384)[1:4]
    expected = hf_gguf_greedy(folder, prompts, NEW_TOKENS)
    got = engine_greedy(
        str(folder / "toy.gguf"),
        prompts,
        NEW_TOKENS,
        token_budget=16,
        tensor_parallel=2,
        worker_start_timeout_s=120,
    )
    assert got == expected


def test_config_maps_onto_the_hf_fields(toy_checkpoint, tmp_path_factory):
    """Every field the model code reads equals the one read from the original config.json."""
    for family, overrides, tensor_type, _ in CASES.values():
        path, folder = gguf_checkpoint(toy_checkpoint, tmp_path_factory, family, overrides, tensor_type)
        ours = ModelConfig.from_pretrained(folder)
        original = ModelConfig.from_pretrained(path)
        for field in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_position_embeddings", "rope_theta", "layer_sliding_windows",
            "tie_word_embeddings", "qkv_bias", "o_proj_bias", "bos_token_id", "eos_token_ids",
        ):  # fmt: skip
            assert getattr(ours, field) == getattr(original, field), (family, field)
        assert ours.norm_eps == pytest.approx(original.norm_eps, rel=1e-6)  # float32 in the file
        want_scaling = {k: v for k, v in (original.rope_scaling or {}).items() if k != "rope_type"}
        have_scaling = {k: v for k, v in (ours.rope_scaling or {}).items() if k != "rope_type"}
        assert have_scaling == want_scaling, family
    linear = toy_checkpoint("llama", rope_scaling=dict(rope_type="linear", factor=2.0))
    folder = tmp_path_factory.mktemp("gguf-linear")
    config = read_config(write_gguf(linear, folder / "toy.gguf"))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    "tensor_type",
    ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"],
)
def test_weights_equal_what_hf_dequantizes(toy_checkpoint, tmp_path, tensor_type):
    """Each tensor type dequantizes, is named and (query/key) reordered as HF's GGUF loader does;
    F32 gives back the original tensors exactly. (The K-quants' blocks of 256 values need a wider
    toy, and random blocks: the ``gguf`` package cannot quantize to them.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    wide = dict(hidden_size=256, intermediate_size=512) if tensor_type.endswith("_K") else {}
    path = toy_checkpoint("llama", num_key_value_heads=2, **wide)
    file = write_gguf(path, tmp_path / "toy.gguf", tensor_type, with_tokenizer=False)
    ours = dict(iterate_tensors(file))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="toy.gguf", dtype=torch.float32)
    expected = hf.state_dict()
    assert set(ours) == set(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
    if tensor_type == "F32":
        original = load_file(str(Path(path) / "model.safetensors"))
        assert all(torch.equal(ours[name], original[name]) for name in original)
    else:  # the quantization is real: some weights moved
        original = load_file(str(Path(path) / "model.safetensors"))
        assert not torch.equal(
            ours["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
        )


def test_index_reads_what_gguf_reader_reads(toy_checkpoint, tmp_path):
    """`GGUFIndex` (our header reader) agrees with the ``gguf`` package's reader on every
    metadata value it keeps and on every tensor's name, type, shape and bytes."""
    file = write_gguf(toy_checkpoint("qwen2"), tmp_path / "toy.gguf", "Q4_0")
    index = GGUFIndex(file, string_arrays=("tokenizer.ggml.tokens",))
    reader = gguf.GGUFReader(str(file))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.STRING:
            expected = bytes(field.parts[field.data[0]]).decode()
        elif kind == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
            expected = (
                [bytes(field.parts[i]).decode() for i in field.data]
                if key == "tokenizer.ggml.tokens"
                else None
            )
        elif kind == gguf.GGUFValueType.ARRAY:
            expected = [field.parts[i].tolist()[0] for i in field.data]
        else:
            expected = field.parts[field.data[0]].tolist()[0]
        assert index.metadata[key] == expected, key
    assert list(index.tensors) == [tensor.name for tensor in reader.tensors]
    for tensor in reader.tensors:
        ours = index.tensors[tensor.name]
        assert ours.type_id == tensor.tensor_type and ours.shape == tuple(reversed(tensor.shape.tolist()))
        raw = np.frombuffer(index._map, np.uint8, ours.nbytes, ours.offset)
        assert np.array_equal(raw, np.asarray(tensor.data).view(np.uint8).reshape(-1)), tensor.name


# -- what is refused, and how ---------------------------------------------------------------------------


def test_unsupported_architecture_is_named(toy_checkpoint, tmp_path):
    file = write_gguf(
        toy_checkpoint("llama"), tmp_path / "toy.gguf", architecture="falcon", with_tokenizer=False
    )
    with pytest.raises(
        UnsupportedModelError, match=r"architecture 'falcon' is not supported.*llama, mistral, qwen2"
    ):
        ModelConfig.from_pretrained(file)


def test_unsupported_tensor_type_is_named(toy_checkpoint, tmp_path):
    file = write_iq4_gguf(toy_checkpoint("llama"), tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"tensor type\(s\) IQ4_NL are not supported.*Q4_0"):
        ModelConfig.from_pretrained(file)


def write_iq4_gguf(checkpoint: str, folder: Path) -> Path:
    """A GGUF file whose first MLP weight is stored as IQ4_NL (a type fastgen refuses)."""
    original = write_gguf(checkpoint, folder / "source.gguf", with_tokenizer=False)
    reader = gguf.GGUFReader(str(original))
    writer = gguf.GGUFWriter(str(folder / "iq4.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        value = (
            bytes(field.parts[field.data[0]]).decode()
            if field.types[0] == gguf.GGUFValueType.STRING
            else field.parts[field.data[0]].tolist()[0]
        )
        writer.add_key_value(key, value, field.types[0])
    for tensor in reader.tensors:
        if tensor.name == "blk.0.ffn_up.weight":
            rows, columns = tensor.data.shape
            blocks = np.zeros((rows, columns // 32 * 18), dtype=np.uint8)
            writer.add_tensor(tensor.name, blocks, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original.unlink()
    return folder / "iq4.gguf"


def test_which_file_a_path_names(tmp_path):
    assert gguf_file_in(tmp_path) is None  # empty directory
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert gguf_file_in(tmp_path) == tmp_path / "a.gguf"
    assert gguf_file_in(tmp_path / "a.gguf") == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError, match="several GGUF files"):
        gguf_file_in(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert gguf_file_in(tmp_path) is None  # a Hugging Face directory, whatever else it holds
    split = tmp_path / "model-00001-of-00002.gguf"
    split.write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError, match="split GGUF"):
        gguf_file_in(split)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not gguf")
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        resolve_model(fake)
