"""Workloads and model shapes for the serving benchmark (the DeepSpeed-FastGen methodology).

A workload is a stream of requests whose prompt and generation lengths are drawn from
N(mean, 0.3 * mean), rounded, clipped to at least 1 token and to the model's context, with random
prompt token ids that avoid the special ids (0, 1, 2). The stream starts from seed 42, so every run
of the benchmark replays the same requests; each run takes the next requests of the stream, so no
prompt repeats across runs (a prefix cache can't make a later run look faster).

Model shapes are config.json files for dummy-weight runs (``load_format="dummy"``): the shape is
what costs time, not the weights. `write_model_dir` writes the config and a tokenizer of the
model's vocabulary size.

    python benchmarks/workloads.py            # prints the length statistics of each workload
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEED = 42
LENGTH_STD_FRACTION = 0.3
NUM_SPECIAL_TOKENS = 3  # <unk>, <s>, </s>: ids 0..2 never appear in a prompt

# name -> (mean prompt tokens, mean generated tokens)
WORKLOADS: dict[str, tuple[int, int]] = {
    "1200-128": (1200, 128),
    "2600-60": (2600, 60),
    "512-512": (512, 512),
}

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "llama2-13b": {
        **_LLAMA_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "llama3-8b": {  # meta-llama/Meta-Llama-3-8B's config.json (GQA 32/8, rope_theta 5e5, no rope_scaling)
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    # the smallest real shape of each family besides Llama that MII serves (issue 16); bos/eos are
    # the benchmark tokenizer's
    "falcon-7b": {  # tiiuae/falcon-7b: multi-query (71 query heads: tensor_parallel 1 only), parallel block
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "multi_query": True,
        "new_decoder_architecture": False,
        "parallel_attn": True,
        "alibi": False,
        "bias": False,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 65024,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    "opt-125m": {  # facebook/opt-125m
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "do_layer_norm_before": True,
        "word_embed_proj_dim": 768,
        "activation_function": "relu",
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    },
    "qwen-1.8b": {  # Qwen/Qwen-1_8B (v1; dynamic NTK: contexts up to seq_length)
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "kv_channels": 128,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "seq_length": 8192,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": False,
        "vocab_size": 151936,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    "tiny": {  # CPU smoke runs
        **_LLAMA_COMMON,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    },
}


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: prompt token ids and how many tokens to generate."""

    index: int
    prompt_token_ids: list[int]
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def parse_workload(name: str, scale: float = 1.0) -> tuple[int, int]:
    """Mean (prompt, generated) tokens of a named workload or of ``"P-G"``, times ``scale``."""
    if name in WORKLOADS:
        prompt, gen = WORKLOADS[name]
    else:
        try:
            prompt, gen = (int(part) for part in name.split("-"))
        except ValueError:
            raise ValueError(
                f"workload {name!r}: expected one of {list(WORKLOADS)} or 'PROMPT-GEN'"
            ) from None
    return max(1, round(prompt * scale)), max(1, round(gen * scale))


class WorkloadStream:
    """An endless, reproducible stream of requests with normally distributed lengths."""

    def __init__(
        self,
        mean_prompt_tokens: int,
        mean_new_tokens: int,
        *,
        vocab_size: int,
        max_model_len: int,
        seed: int = SEED,
    ):
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.mean_prompt_tokens = mean_prompt_tokens
        self.mean_new_tokens = mean_new_tokens
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._rng = np.random.default_rng(seed)
        self._next_index = 0

    def _length(self, mean: int) -> int:
        return max(1, round(self._rng.normal(mean, LENGTH_STD_FRACTION * mean)))

    def next_request(self) -> BenchRequest:
        prompt_tokens = min(self._length(self.mean_prompt_tokens), self.max_model_len - 1)
        new_tokens = min(self._length(self.mean_new_tokens), self.max_model_len - prompt_tokens)
        low = min(NUM_SPECIAL_TOKENS, self.vocab_size - 1)
        ids = self._rng.integers(low, self.vocab_size, size=prompt_tokens).tolist()
        request = BenchRequest(self._next_index, ids, new_tokens)
        self._next_index += 1
        return request

    def take(self, count: int) -> list[BenchRequest]:
        """The next ``count`` requests of the stream."""
        return [self.next_request() for _ in range(count)]


def fixed_request(prompt_tokens: int, new_tokens: int, vocab_size: int, seed: int = SEED) -> BenchRequest:
    """A request of exact lengths (the batch-1 decode measurement)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(NUM_SPECIAL_TOKENS, vocab_size - 1), vocab_size, size=prompt_tokens).tolist()
    return BenchRequest(-1, ids, new_tokens)


def prefix_requests(
    prefix_tokens: int, suffix_tokens: int, new_tokens: int, count: int, vocab_size: int, *, shared: bool
) -> list[BenchRequest]:
    """``count`` requests of ``prefix_tokens + suffix_tokens`` prompt tokens: with ``shared``, all
    begin with the same ``prefix_tokens`` (a system prompt), otherwise no two share a prefix
    (the same lengths with nothing for a prefix cache to find)."""
    rng = np.random.default_rng(SEED + 7 + shared)
    low = min(NUM_SPECIAL_TOKENS, vocab_size - 1)
    common = rng.integers(low, vocab_size, size=prefix_tokens).tolist()
    requests = []
    for index in range(count):
        prefix = common if shared else rng.integers(low, vocab_size, size=prefix_tokens).tolist()
        suffix = rng.integers(low, vocab_size, size=suffix_tokens).tolist()
        requests.append(BenchRequest(index, prefix + suffix, new_tokens))
    return requests


# -- model directories for dummy-weight runs -------------------------------------------------------


def write_model_dir(path: str | Path, shape: str) -> Path:
    """Write ``config.json``, ``generation_config.json`` and a tokenizer for ``shape`` into ``path``.

    Reuses a directory that already holds the same config (building the tokenizer takes a second).
    """
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(MODEL_SHAPES)}")
    path = Path(path)
    config = MODEL_SHAPES[shape]
    config_file = path / "config.json"
    tokenizer_file = path / "tokenizer.json"
    if config_file.is_file() and tokenizer_file.is_file() and json.loads(config_file.read_text()) == config:
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, config["vocab_size"])
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    config_file.write_text(json.dumps(config, indent=2))
    return path


def write_tokenizer(path: str | Path, vocab_size: int) -> None:
    """Save a byte-level BPE tokenizer with exactly ``vocab_size`` tokens to ``path``.

    Three special tokens, the 256 byte symbols, then merges, breadth-first (`_merges`), until the
    vocabulary is full: every id decodes to bytes, as with a real byte-level vocabulary, so the
    engine's incremental detokenizer does its usual work (including incomplete UTF-8 sequences).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(specials) + len(alphabet)}, got {vocab_size}")
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    merges = list(itertools.islice(_merges(alphabet), vocab_size - len(vocab)))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(str(path))


def _merges(alphabet: list[str]) -> Iterator[tuple[str, str]]:
    """BPE merges, breadth-first and without end: every pair of byte symbols (tokens of two bytes),
    then every two-byte token extended by one byte symbol on the right (three bytes), and so on.

    Each merge makes a new token (a string of k symbols is only ever made as its first k - 1
    symbols + its last one), and both halves of a merge are tokens made before it.
    """
    level = alphabet
    while True:
        longer: list[str] = []
        for left in level:
            for right in alphabet:
                yield left, right
                longer.append(left + right)
        level = longer


# -- arithmetic of a shape (for ceilings and rooflines) ---------------------------------------------


@dataclass(frozen=True)
class ShapeArithmetic:
    """Parameter, byte and FLOP counts of a dense decoder config (biases and norms left out), read
    through fastgen's own config reader, so every family's config counts alike."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2
    linear_bytes: int = 2  # bytes a weight of the decoder layers' linears (1 with FP8 weights)
    kv_element_bytes: int = 2  # bytes a cached key or value element (1 with an FP8 KV cache)
    mlp_matrices: int = 3  # gate, up and down; 2 for a plain MLP (fc1, fc2)
    tied_embeddings: bool = False  # the LM head is the embedding table
    embedding_dim: int | None = None  # of the token embeddings, when not hidden_size (OPT-350m)

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        dtype_bytes: int = 2,
        linear_bytes: int | None = None,
        kv_element_bytes: int | None = None,
    ) -> ShapeArithmetic:
        from fastgen.models.config import ModelConfig

        model = ModelConfig.from_dict(config)
        return cls(
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            vocab_size=model.vocab_size,
            mlp_matrices=3 if model.gated_mlp else 2,
            tied_embeddings=model.tie_word_embeddings,
            embedding_dim=model.embedding_dim,
            dtype_bytes=dtype_bytes,
            linear_bytes=dtype_bytes if linear_bytes is None else linear_bytes,
            kv_element_bytes=dtype_bytes if kv_element_bytes is None else kv_element_bytes,
        )

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linears (attention projections and MLP)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.num_layers * (h * q + 2 * h * kv + q * h + self.mlp_matrices * h * self.intermediate_size)

    @property
    def layer_params(self) -> int:
        """Parameters of all decoder layers (attention, MLP, two norms each) and the final norm."""
        return self.linear_params + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * (self.embedding_dim or self.hidden_size)

    @property
    def total_params(self) -> int:
        """Layers, input embedding and LM head (the same table when tied)."""
        return self.layer_params + (1 if self.tied_embeddings else 2) * self.embedding_params

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step must read: every weight except the input embedding table
        (a step reads only its batch's rows of it); FP8 linears count one byte a weight."""
        other = self.layer_params - self.linear_params + self.embedding_params
        return self.linear_params * self.linear_bytes + other * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_element_bytes

    def prefill_flops(self, prompt_tokens: int) -> float:
        """FLOPs of one prompt's prefill: 2 * layer params per token, causal attention
        (QK^T and PV: 2 * 2 * heads * head_dim FLOPs per query-key pair, L(L+1)/2 pairs a layer),
        and the LM head at the one sampled position."""
        dense = 2.0 * self.layer_params * prompt_tokens
        pairs = prompt_tokens * (prompt_tokens + 1) / 2
        attention = 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs
        return dense + attention + 2.0 * self.embedding_params


def roofline(
    arithmetic: ShapeArithmetic,
    lengths: list[tuple[int, int]],
    *,
    matmul_flops_per_s: float,
    copy_bytes_per_s: float,
    kv_capacity_tokens: int,
    max_seqs: int,
) -> dict[str, float]:
    """Lower bound on the time of an offline run of requests with (prompt, generated) ``lengths``.

    - prefill: sum of `ShapeArithmetic.prefill_flops` / measured bf16 matmul rate;
    - decode: the first token of each request comes with its prefill; the other tokens need
      ``steps = max(max(g) - 1, ceil(sum(g - 1) / C))`` decode steps, with C, the sequences the
      cache holds at once, ``min(max_seqs, kv_capacity_tokens // mean(prompt + generated))``;
      each step reads the weights once: ``steps * decode_weight_bytes / copy bandwidth``;
    - ``roofline_s = prefill_s + decode_s`` (the issue's formula); ``kv_read_s``, the time to read
      each decode token's KV context once (sum over tokens of context * kv_bytes_per_token / copy
      bandwidth), is not in it and is reported beside it (``roofline_with_kv_s``).
    """
    if not lengths:
        return {}
    prefill_flops = sum(arithmetic.prefill_flops(p) for p, _ in lengths)
    mean_tokens = sum(p + g for p, g in lengths) / len(lengths)
    concurrency = max(1, min(max_seqs, int(kv_capacity_tokens // mean_tokens)))
    decode_tokens = sum(g - 1 for _, g in lengths)
    steps = max(max(g - 1 for _, g in lengths), math.ceil(decode_tokens / concurrency))
    kv_tokens_read = sum((g - 1) * p + (g - 1) * g / 2 for p, g in lengths)
    prefill_s = prefill_flops / matmul_flops_per_s
    decode_s = steps * arithmetic.decode_weight_bytes / copy_bytes_per_s
    kv_read_s = kv_tokens_read * arithmetic.kv_bytes_per_token / copy_bytes_per_s
    return {
        "prefill_flops": prefill_flops,
        "prefill_s": prefill_s,
        "concurrency": concurrency,
        "decode_steps": steps,
        "decode_s": decode_s,
        "roofline_s": prefill_s + decode_s,
        "kv_read_s": kv_read_s,
        "roofline_with_kv_s": prefill_s + decode_s + kv_read_s,
    }


def _describe() -> None:
    for name, (prompt, gen) in WORKLOADS.items():
        requests = WorkloadStream(prompt, gen, vocab_size=32000, max_model_len=4096).take(512)
        prompts = np.array([r.prompt_tokens for r in requests])
        gens = np.array([r.max_new_tokens for r in requests])
        print(
            f"{name}: prompt mean {prompts.mean():.0f} sd {prompts.std():.0f} "
            f"[{prompts.min()}, {prompts.max()}]"
            f" | generated mean {gens.mean():.0f} sd {gens.std():.0f} [{gens.min()}, {gens.max()}]"
        )
    for shape, config in MODEL_SHAPES.items():
        arithmetic = ShapeArithmetic.from_config(config)
        print(
            f"{shape}: {arithmetic.total_params / 1e9:.2f} G params, decode reads "
            f"{arithmetic.decode_weight_bytes / 1e9:.2f} GB, "
            f"KV {arithmetic.kv_bytes_per_token / 1024:.0f} KiB/token"
        )


if __name__ == "__main__":
    _describe()
