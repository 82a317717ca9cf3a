"""Writing tiny GGUF files from toy Hugging Face checkpoints, the way llama.cpp's converter lays
them out (metadata keys, tensor names, the query/key row order of Llama), for the GGUF tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# HF name pieces -> GGUF ones
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}


def gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{kind}"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{_LAYER[module]}.{kind}"


def interleave_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's reordering of a Llama query/key projection: within each head, rows ``i`` and
    ``i + head_dim/2`` (the two halves HF's rotary pairs) become neighbours."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(rotary_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter stores as ``rope_freqs.weight`` for Llama 3.1-style scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, rotary_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / rotary_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(
    checkpoint: str | Path,
    out: str | Path,
    tensor_type: str = "F32",
    *,
    architecture: str | None = None,
    with_tokenizer: bool = True,
    name: str = "toy",
) -> Path:
    """Write the toy HF ``checkpoint`` as a GGUF file: 2-D weights in ``tensor_type`` (norms and
    biases stay F32, as llama.cpp keeps them), metadata as llama.cpp's converter names it."""
    import gguf
    from safetensors.torch import load_file

    checkpoint, out = Path(checkpoint), Path(out)
    config = json.loads((checkpoint / "config.json").read_text())
    architecture = architecture or config["model_type"]
    state = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(file))
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_string("general.name", name)
    writer.add_uint32("general.file_type", _FILE_TYPES.get(tensor_type, 15))
    writer.add_uint32(f"{architecture}.context_length", config["max_position_embeddings"])
    writer.add_uint32(f"{architecture}.embedding_length", config["hidden_size"])
    writer.add_uint32(f"{architecture}.block_count", config["num_hidden_layers"])
    writer.add_uint32(f"{architecture}.vocab_size", config["vocab_size"])
    writer.add_uint32(f"{architecture}.feed_forward_length", config["intermediate_size"])
    writer.add_uint32(f"{architecture}.attention.head_count", heads)
    writer.add_uint32(f"{architecture}.attention.head_count_kv", kv_heads)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_float32(f"{architecture}.rope.freq_base", theta)
    writer.add_uint32(f"{architecture}.rope.dimension_count", head_dim)
    if config.get("sliding_window") and architecture != "qwen2":
        writer.add_uint32(f"{architecture}.attention.sliding_window", config["sliding_window"])
    scaling = rope if rope.get("rope_type", "default") != "default" else config.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "linear":
        writer.add_string(f"{architecture}.rope.scaling.type", "linear")
        writer.add_float32(f"{architecture}.rope.scaling.factor", scaling["factor"])
    if scaling and scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, theta, scaling))
    if with_tokenizer:
        _add_tokenizer(writer, checkpoint)

    for hf_name, tensor in state.items():
        values = tensor.to(torch.float32).numpy()
        if architecture in ("llama", "mistral") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            values = interleave_rotary_rows(values, heads if "q_proj" in hf_name else kv_heads)
        kind = tensor_type if values.ndim == 2 else "F32"
        if kind.endswith("_K"):  # gguf cannot quantize these: random blocks, the same for HF and fastgen
            writer.add_tensor(
                gguf_name(hf_name),
                random_blocks(values.shape, kind),
                raw_dtype=gguf.GGMLQuantizationType[kind],
            )
        elif kind == "F32":
            writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(values))
        elif kind == "F16":
            writer.add_tensor(gguf_name(hf_name), values.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def random_blocks(shape: tuple[int, ...], kind: str, seed: int = 0) -> np.ndarray:
    """Random quantized blocks of type ``kind`` for a float tensor of ``shape``: every byte below
    0x3C, so that each float16 scale in a block is finite and below 1."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    rows, columns = shape
    assert columns % block_size == 0, f"{kind} needs rows of a multiple of {block_size} values"
    return np.random.default_rng(seed).integers(
        0, 0x3C, (rows, columns // block_size * type_size), dtype=np.uint8
    )


def _add_tokenizer(writer, checkpoint: Path) -> None:
    """The toy's byte-level BPE tokenizer as llama.cpp stores a GPT-2-style one."""
    data = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in data.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt-2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3 if token in special else 1 for token in tokens])
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", vocab["<s>"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab["</s>"])
    writer.add_uint32("tokenizer.ggml.unknown_token_id", vocab["<unk>"])
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template")
    if template is None and (checkpoint / "chat_template.jinja").is_file():
        template = (checkpoint / "chat_template.jinja").read_text()
    if template:
        writer.add_string("tokenizer.chat_template", template)
