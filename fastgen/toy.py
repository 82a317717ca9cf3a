"""Tiny random checkpoints with a trained tokenizer, for tests and examples that run on a CPU
with no model hub. ``make_toy_checkpoint(path)`` writes a complete Hugging Face model directory
(config.json, safetensors weights, tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

_WORDS = [
    "the",
    "engine",
    "schedules",
    "every",
    "request",
    "over",
    "a",
    "paged",
    "cache",
    "of",
    "blocks",
    "while",
    "decodes",
    "run",
    "first",
    "and",
    "prompts",
    "fill",
    "the",
    "rest",
    "of",
    "the",
    "budget",
    "in",
    "chunks",
    "so",
    "that",
    "the",
    "accelerator",
    "stays",
    "busy",
    "and",
    "latency",
    "stays",
    "low",
    "for",
    "everyone",
    "who",
    "waits",
    "on",
    "a",
    "stream",
    "of",
    "tokens",
    "from",
    "the",
    "model",
    "in",
    "the",
    "loop",
    "of",
    "the",
    "host",
    "DeepSpeed",
    "is",
    "a",
    "library",
    "for",
    "training",
    "and",
    "inference",
    "of",
    "large",
    "models",
    "Seattle",
    "is",
    "a",
    "city",
    "by",
    "the",
    "water",
    "with",
    "rain",
    "and",
    "coffee",
    "and",
    "mountains",
    "in",
    "the",
    "distance",
    "numbers",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "42",
    "héllo",
    "wörld",
    "naïve",
    "café",
    "東京",
    "こんにちは",
    "🙂",
    "👍",
    "—",
    "ñ",
    "ü",
    "ß",
]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _corpus() -> list[str]:
    lines = []
    for i in range(400):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12 + i % 9)]
        lines.append(" ".join(words))
    lines.append(" ".join(_WORDS))
    return lines


def train_tokenizer(path: str | Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer and save it (HF format) to ``path``; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    wrapped.save_pretrained(str(path))
    return len(wrapped)


_TINY = dict(  # the shape every toy family shares
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,  # tied toy embeddings tend to repeat one token: a weak test
)
_QWEN = dict(num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0)

_FAMILIES = {
    "llama": dict(
        _TINY,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "mistral": dict(
        _TINY,
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=24,
    ),
    "qwen2": dict(_TINY, **_QWEN, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    # head_dim is not hidden / heads, as in the real Qwen3 models
    "qwen3": dict(_TINY, **_QWEN, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
    "mixtral": dict(
        _TINY,
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "gemma": dict(
        _TINY,
        architectures=["GemmaForCausalLM"],
        model_type="gemma",
        num_key_value_heads=1,  # MQA, as Gemma-2B
        head_dim=32,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    ),
    "gemma2": dict(
        _TINY,
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=24,  # not head_dim, as Gemma-2-27B
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        sliding_window=24,
        attn_logit_softcapping=3.0,  # small enough that the toy's scores are capped
        final_logit_softcapping=2.0,
    ),
    "gemma3_text": dict(
        _TINY,
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={  # local layers and global ones rotate differently
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
    ),
    "gemma3": dict(  # multimodal: the text model beside a (tiny) vision tower
        architectures=["Gemma3ForConditionalGeneration"],
        model_type="gemma3",
        text_config=None,  # the gemma3_text family's, filled in below
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        mm_tokens_per_image=4,
        tie_word_embeddings=False,
    ),
    "phi": dict(
        _TINY,
        architectures=["PhiForCausalLM"],
        model_type="phi",
        num_key_value_heads=4,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,  # rotary on 8 of the 16 features of each head
    ),
    "falcon": dict(  # the 7B layout: multi-query attention beside the MLP, one LayerNorm
        architectures=["FalconForCausalLM"],
        model_type="falcon",
        hidden_size=64,
        ffn_hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        bias=False,
        alibi=False,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
    ),
    "opt": dict(  # pre-norm, as OPT-125m and the larger ones
        architectures=["OPTForCausalLM"],
        model_type="opt",
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        do_layer_norm_before=True,
        word_embed_proj_dim=64,
        activation_function="relu",
        tie_word_embeddings=False,
    ),
    # Qwen v1 has no transformers class: the toy is a Qwen2 model (multi-head, no o_proj bias)
    # written in Qwen's own layout (see `qwen_layout`)
    "qwen": dict(
        architectures=["QWenLMHeadModel"],
        model_type="qwen",
        hidden_size=64,
        intermediate_size=256,  # twice the MLP's width, as Qwen counts it
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=16,
        layer_norm_epsilon=1e-6,
        max_position_embeddings=512,
        seq_length=512,
        rotary_emb_base=10000,
        rotary_pct=1.0,
        use_dynamic_ntk=False,
        use_logn_attn=False,
        no_bias=True,
        tie_word_embeddings=False,
    ),
}


def make_toy_checkpoint(
    path: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    weight_std: float = 0.08,
    shards: int = 1,
    weights_format: str = "safetensors",
    train_steps: int = 0,
    train_device: str = "cpu",
    **config_overrides,
) -> Path:
    """Write a tiny random ``family`` checkpoint with a trained tokenizer to ``path``.

    ``config_overrides`` go into config.json (e.g. ``num_key_value_heads=1``,
    ``rope_scaling={...}``); ``shards > 1`` writes an indexed, sharded safetensors checkpoint;
    ``weights_format="bin"`` writes ``pytorch_model.bin`` instead. ``train_steps > 0`` trains the
    random model on the tokenizer's corpus first, which gives it confident (peaked) predictions
    like a real language model, rather than the near-ties of random weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = train_tokenizer(path)
    fields = dict(_FAMILIES[family])
    fields.update(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    fields.update(config_overrides)
    if "text_config" in fields:  # a multimodal model: the language model's settings go inside
        text = {k: v for k, v in _FAMILIES["gemma3_text"].items() if k not in ("architectures", "model_type")}
        text.update(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
        fields["text_config"] = {**text, **(fields["text_config"] or {})}
    written_config = fields if fields["model_type"] == "qwen" else None
    if written_config is not None:
        fields = _qwen2_twin_fields(fields)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            norm = "norm" in name or ".ln_" in name  # Falcon's ln_attn, ln_mlp, ln_f
            if norm and name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif norm:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, weight_std)
    if train_steps:
        _train(model, path, train_steps, train_device, seed)
    if written_config is not None:
        _write_in_qwen_layout(model, written_config, path, weights_format)
    elif weights_format == "bin":
        config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, path / "pytorch_model.bin")
    else:
        shard_size = None if shards <= 1 else _shard_size_for(model, shards)
        model.save_pretrained(path, max_shard_size=shard_size or "10GB")
    _write_generation_config(path)
    return path


def _qwen2_twin_fields(qwen: dict) -> dict:
    """The Qwen2 config of the same model as a Qwen (v1) config with Qwen's defaults."""
    heads = qwen["num_attention_heads"]
    return dict(
        model_type="qwen2",
        vocab_size=qwen["vocab_size"],
        hidden_size=qwen["hidden_size"],
        intermediate_size=qwen["intermediate_size"] // 2,
        num_hidden_layers=qwen["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=qwen["kv_channels"],
        rms_norm_eps=qwen["layer_norm_epsilon"],
        rope_theta=float(qwen["rotary_emb_base"]),
        max_position_embeddings=qwen["max_position_embeddings"],
        tie_word_embeddings=qwen["tie_word_embeddings"],
        bos_token_id=qwen.get("bos_token_id"),
        eos_token_id=qwen.get("eos_token_id"),
        pad_token_id=None,
    )


def qwen_layout(state: dict) -> dict:
    """A Qwen2 model's tensors under Qwen (v1)'s names: q, k and v fused into ``c_attn``, the gate
    as ``w2`` and the up projection as ``w1`` (Qwen computes ``c_proj(w1(x) * silu(w2(x)))``)."""
    import torch

    renamed = {}
    for name, tensor in state.items():
        for ours, theirs in _QWEN_NAMES:
            name = name.replace(ours, theirs)
        renamed[name] = tensor
    for key in [k for k in renamed if ".attn.q_proj." in k]:
        parts = [renamed.pop(key.replace(".q_proj.", f".{which}_proj.")) for which in "qkv"]
        renamed[key.replace(".q_proj.", ".c_attn.")] = torch.cat(parts)
    return {name: tensor.contiguous() for name, tensor in renamed.items()}


_QWEN_NAMES = (
    ("model.embed_tokens.", "transformer.wte."),
    ("model.norm.", "transformer.ln_f."),
    ("model.layers.", "transformer.h."),
    (".input_layernorm.", ".ln_1."),
    (".post_attention_layernorm.", ".ln_2."),
    (".self_attn.o_proj.", ".attn.c_proj."),
    (".self_attn.", ".attn."),
    (".mlp.gate_proj.", ".mlp.w2."),
    (".mlp.up_proj.", ".mlp.w1."),
    (".mlp.down_proj.", ".mlp.c_proj."),
)


def _write_in_qwen_layout(model, config: dict, path: Path, weights_format: str) -> None:
    import torch
    from safetensors.torch import save_file

    state = qwen_layout(model.state_dict())
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if weights_format == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _train(model, path: Path, steps: int, device: str, seed: int) -> None:
    """A few hundred AdamW steps of next-token prediction on the toy corpus."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer("\n".join(_corpus()))["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window, batch = 64, 16
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window, (batch,), generator=generator)
        tokens = torch.stack([ids[s : s + window] for s in starts.tolist()]).to(device)
        loss = model(tokens, labels=tokens, use_cache=False).loss  # HF shifts the labels itself
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.to("cpu").eval()


def _shard_size_for(model, shards: int) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, total // shards + 1)


def _write_generation_config(path: Path) -> None:
    # transformers may write a generation config with sampling defaults; the toy models are greedy
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})
    )
