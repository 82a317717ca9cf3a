"""Greedy outputs of fastgen equal HF transformers token for token (float32, CPU), with a small
token budget so prompts are split across steps and mixed with decodes."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from tests.helpers import engine_greedy, hf_greedy

NEW_TOKENS = 24


def prompts_of_mixed_lengths(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 7, 40, 130, 3, 75]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


CASES = {
    "llama-mha": ("llama", {}),
    "llama-gqa-llama3-rope": (
        "llama",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama-mqa-linear-rope-tied": (
        "llama",
        dict(
            num_key_value_heads=1, rope_scaling=dict(rope_type="linear", factor=2.0), tie_word_embeddings=True
        ),
    ),
    # within the original context dynamic NTK leaves the frequencies alone (beyond it: below)
    "llama-dynamic-rope-within-the-context": (
        "llama",
        dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    ),
    "mistral-sliding-window": ("mistral", dict(sliding_window=24)),
    "qwen2-qkv-bias": ("qwen2", {}),
    # the last layer slides a 24-token window, the first attends to everything
    "qwen2-sliding-last-layer": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=24, max_window_layers=1),
    ),
    "qwen3-qk-norm-head-dim": ("qwen3", {}),
    "phi-parallel-block-partial-rotary": ("phi", {}),
    "mixtral-top2-of-4-experts": ("mixtral", {}),
    "gemma-geglu-mqa-offset-norms-scaled-embeddings": ("gemma", {}),
    "gemma-legacy-gelu-name": ("gemma", dict(hidden_act="gelu")),  # means the tanh GELU
    "gemma2-softcaps-alternating-windows-sandwich-norms": ("gemma2", {}),
    "gemma3-text-qk-norms-rope-per-layer-type": ("gemma3_text", {}),
    "gemma3-multimodal-checkpoint-served-as-text": ("gemma3", {}),
    "falcon-7b-multi-query-parallel-block": ("falcon", {}),
    "falcon-40b-grouped-kv-two-norms": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon2-new-decoder-one-norm": (
        "falcon",
        dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, rope_theta=500000.0),
    ),
    # rotary, but neither parallel nor multi-query: q, k, v interleaved per head; biases
    "falcon-sequential-interleaved-qkv-biases": (
        "falcon",
        dict(multi_query=False, parallel_attn=False, bias=True),
    ),
    "opt-pre-norm-relu-learned-positions": ("opt", {}),
    "opt-350m-post-norm-projections-tied": (
        "opt",
        dict(do_layer_norm_before=False, word_embed_proj_dim=32, tie_word_embeddings=True),
    ),
    # against transformers' Qwen2 on the same weights written in its layout (see hf_reference)
    "qwen-v1-fused-c-attn": ("qwen", {}),
}


def hf_reference(path: str, family: str) -> str:
    """The checkpoint transformers runs for ``path``: itself, or for Qwen (v1), which transformers
    has no class for, the same weights written as a Qwen2 checkpoint (`qwen2_twin`)."""
    return qwen2_twin(path) if family == "qwen" else path


_TWINS: dict[str, str] = {}


def qwen2_twin(path: str) -> str:
    """A Qwen (v1) checkpoint's weights as a transformers Qwen2 checkpoint, beside it: the same
    model inside the trained context (multi-head attention, q/k/v biases, no o_proj bias).

    Qwen v1 -> Qwen2: ``c_attn`` is q, k and v one after the other; the MLP computes
    ``c_proj(w1(x) * silu(w2(x)))``, so ``w2`` is Qwen2's gate and ``w1`` its up projection; the
    config's ``intermediate_size`` counts both halves."""
    import torch
    from safetensors.torch import load_file, save_file

    if path in _TWINS:
        return _TWINS[path]
    source, twin = Path(path), Path(path + "-qwen2-twin")
    twin.mkdir(exist_ok=True)
    for file in source.iterdir():
        if file.suffix not in (".safetensors", ".bin") and file.name != "config.json":
            (twin / file.name).write_bytes(file.read_bytes())
    qwen = json.loads((source / "config.json").read_text())
    heads = qwen["num_attention_heads"]
    config = dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=qwen["vocab_size"],
        hidden_size=qwen["hidden_size"], intermediate_size=qwen["intermediate_size"] // 2,
        num_hidden_layers=qwen["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        rms_norm_eps=qwen["layer_norm_epsilon"], rope_theta=float(qwen["rotary_emb_base"]),
        max_position_embeddings=qwen["max_position_embeddings"], tie_word_embeddings=False,
        bos_token_id=qwen.get("bos_token_id"), eos_token_id=qwen.get("eos_token_id"),
    )  # fmt: skip
    (twin / "config.json").write_text(json.dumps(config))
    renames = [
        ("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
        ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."), (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.w1.", ".mlp.up_proj."), (".mlp.w2.", ".mlp.gate_proj."), (".mlp.c_proj.", ".mlp.down_proj."),
    ]  # fmt: skip
    weights = {}
    files = sorted(source.glob("*.safetensors"))
    state = load_file(str(files[0])) if files else torch.load(source / "pytorch_model.bin", weights_only=True)
    for name, tensor in state.items():
        for old, new in renames:
            name = name.replace(old, new)
        if ".attn.c_attn." in name:
            for which, part in zip("qkv", tensor.chunk(3), strict=True):
                weights[name.replace(".attn.c_attn.", f".self_attn.{which}_proj.")] = part.contiguous()
        else:
            weights[name] = tensor
    save_file(weights, str(twin / "model.safetensors"), metadata={"format": "pt"})
    _TWINS[path] = str(twin)
    return str(twin)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(toy_checkpoint, case):
    family, overrides = CASES[case]
    path = toy_checkpoint(family, **overrides)
    prompts = prompts_of_mixed_lengths(384)
    expected = hf_greedy(hf_reference(path, family), prompts, NEW_TOKENS)
    got = engine_greedy(path, prompts, NEW_TOKENS, token_budget=16, block_size=16)
    for prompt, want, have in zip(prompts, expected, got):
        assert have == want, f"prompt of {len(prompt)} tokens diverged"


def test_dynamic_rope_beyond_the_original_context_matches_hf(toy_checkpoint):
    """Dynamic NTK scaling past ``max_position_embeddings`` (64 here), with ``max_model_len=160``.

    HF recomputes the frequencies from the length of each forward call (``max(position_ids) + 1``),
    so cached keys and new queries of one ``generate`` get rotated with different bases as the
    sequence grows. An engine whose paged cache stores rotated keys needs one set of frequencies:
    vLLM computes them once for ``max_position_embeddings * factor``, which changes them even for
    short prompts; fastgen computes them once for ``max_model_len``, and only when it exceeds
    ``max_position_embeddings``. That keeps an engine run within the original context bit-for-bit
    HF's (the ``llama-dynamic-rope-within-the-context`` case above) and makes a stretched engine
    equal HF's single forward over exactly ``max_model_len`` tokens, which is what is compared
    here: every prompt position and the sampled token of a 159-token prompt plus one token.
    Greedy continuations are not compared: HF's change per step, ours do not, by design."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastgen import SamplingParams
    from tests.helpers import generate_together

    original, max_model_len = 64, 160
    path = toy_checkpoint(
        "llama", max_position_embeddings=original, rope_scaling=dict(rope_type="dynamic", factor=2.0)
    )
    rng = random.Random(5)
    prompt = [rng.randrange(3, 384) for _ in range(max_model_len - 1)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    (out,) = generate_together(path, [(prompt, params)], max_model_len=max_model_len, token_budget=48)

    def hf_log_softmax(tokens: list[int]) -> torch.Tensor:
        # a fresh model each time: HF's dynamic rope keeps the frequencies of the longest call so far
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)

    full = hf_log_softmax(prompt + out.token_ids)  # max_model_len tokens: the engine's frequencies
    expected = [full[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert [entry.logprob for entry in out.prompt_logprobs[1:]] == pytest.approx(expected, abs=1e-4)
    assert out.token_ids == [full[-2].argmax().item()]
    assert out.logprobs[0].logprob == pytest.approx(full[-2].max().item(), abs=1e-4)
    # the scaling is exercised: the default frequencies (HF within the original length) differ
    unscaled = hf_log_softmax(prompt[:original])
    moved = [abs(unscaled[i - 1, prompt[i]].item() - expected[i - 1]) for i in range(1, original)]
    assert max(moved) > 1e-2, max(moved)


def test_sliding_window_matters(toy_checkpoint):
    """The Mistral case must exercise the window: without it the outputs differ."""
    window = toy_checkpoint("mistral", sliding_window=24)
    full = toy_checkpoint("mistral", sliding_window=None)
    prompts = prompts_of_mixed_lengths(384)[3:4]  # 130 tokens, well past the window
    assert engine_greedy(window, prompts, 8) != engine_greedy(full, prompts, 8)


def test_qwen_details_matter(toy_checkpoint):
    """What the Qwen cases add must be exercised: their q/k/v biases and q/k norms are not
    neutral, and the sliding layer changes the output."""
    from safetensors.torch import load_file

    for family, names in (("qwen2", ("q_proj.bias", "k_proj.bias")), ("qwen3", ("q_norm", "k_norm"))):
        weights = load_file(str(Path(toy_checkpoint(family)) / "model.safetensors"))
        for name in names:
            tensor = next(t for key, t in weights.items() if name in key)
            assert tensor.std() > 0.01, (family, name)
    sliding = toy_checkpoint("qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=1)
    prompts = prompts_of_mixed_lengths(384)[3:4]
    assert engine_greedy(sliding, prompts, 8) != engine_greedy(toy_checkpoint("qwen2"), prompts, 8)


def test_gemma2_softcaps_and_window_matter(toy_checkpoint):
    from fastgen import SamplingParams
    from tests.helpers import generate_together
    from tests.test_logprobs import check_against_hf

    prompts = prompts_of_mixed_lengths(384)[3:4]  # 130 tokens, past the 24-token window
    capped = engine_greedy(toy_checkpoint("gemma2"), prompts, 8)
    for change in (
        dict(attn_logit_softcapping=None),
        dict(sliding_window=None, layer_types=["full_attention", "full_attention"]),
    ):
        assert engine_greedy(toy_checkpoint("gemma2", **change), prompts, 8) != capped, change
    # the final cap keeps the argmax; the log-probabilities show it (and equal HF's)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=2)
    outs = {}
    for cap in (2.0, None):
        path = toy_checkpoint("gemma2", final_logit_softcapping=cap)
        (outs[cap],) = generate_together(path, [(prompts[0], params)])
        check_against_hf(path, prompts[0], outs[cap], top_n=2)
    assert outs[2.0].logprobs[0].logprob != pytest.approx(outs[None].logprobs[0].logprob, abs=1e-3)


def test_gemma3_rotary_per_layer_type_matters(toy_checkpoint):
    prompts = prompts_of_mixed_lengths(384)[3:4]
    same_rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    assert engine_greedy(toy_checkpoint("gemma3_text"), prompts, 8) != engine_greedy(
        toy_checkpoint("gemma3_text", rope_parameters=same_rope), prompts, 8
    )


def test_a_checkpoint_missing_an_expert_is_refused(toy_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from fastgen import AsyncEngine, EngineConfig

    source = Path(toy_checkpoint("mixtral"))
    target = tmp_path / "no-expert"
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    del weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})

    async def start():
        await AsyncEngine.start(str(target), EngineConfig(dtype="float32"))

    with pytest.raises(ValueError, match=r"experts\.3\.w2"):
        asyncio.run(start())


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin", "legacy-config"])
def test_checkpoint_layouts(toy_checkpoint, tmp_path, layout):
    if layout == "sharded-safetensors":
        path = toy_checkpoint("llama", shards=3)
        assert (Path(path) / "model.safetensors.index.json").is_file()
    elif layout == "bin":
        path = toy_checkpoint("llama", weights_format="bin", num_key_value_heads=2)
        assert not list(Path(path).glob("*.safetensors"))
    else:
        path = _legacy_rope_config_copy(toy_checkpoint("llama", rope_theta=20000.0), tmp_path)
    prompts = prompts_of_mixed_lengths(384, seed=1)[:3]
    assert engine_greedy(path, prompts, 12, token_budget=32) == hf_greedy(path, prompts, 12)


def _legacy_rope_config_copy(source: str, dest: Path) -> str:
    """A copy whose config.json uses the pre-transformers-5 ``rope_theta``/``rope_scaling`` keys."""
    import shutil

    target = dest / "legacy"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None
    (target / "config.json").write_text(json.dumps(config))
    return str(target)
