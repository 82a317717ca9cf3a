"""`ModelConfig` from configs as they are published, which leave settings to transformers'
defaults or spell them the older way (the toy checkpoints are all written out in full)."""

from __future__ import annotations

from fastgen.models.config import ModelConfig


def test_gemma3_older_rope_spelling_gives_local_and_global_rotary():
    config = ModelConfig.from_dict(
        dict(
            model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window=512,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        )
    )  # fmt: skip
    sliding, full = (10_000.0, None), (1_000_000.0, {"rope_type": "linear", "factor": 8.0})
    assert config.layer_rope == (sliding,) * 5 + (full,)  # the scaling is the global layers' only
    assert config.layer_sliding_windows == (512,) * 5 + (None,)
    assert config.tie_word_embeddings  # Gemma's default


def test_sparse_multimodal_gemma3_text_config_takes_the_defaults():
    config = ModelConfig.from_dict(
        dict(
            model_type="gemma3",
            text_config=dict(
                hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024
            ),
            vision_config={},
        )
    )
    shape = (config.model_type, config.num_heads, config.num_kv_heads, config.head_dim)
    assert shape == ("gemma3_text", 8, 4, 256)
    assert config.weights_prefix == "language_model." and config.tie_word_embeddings
    assert config.attention_scale == 256**-0.5 and config.layer_rope[5][0] == 1_000_000.0
    untied = ModelConfig.from_dict(
        dict(model_type="gemma3", text_config=dict(tie_word_embeddings=True), tie_word_embeddings=False)
    )
    assert not untied.tie_word_embeddings  # the top level decides, as in transformers


def test_gemma2_and_gemma_defaults():
    gemma2 = ModelConfig.from_dict(
        dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000)
    )  # fmt: skip
    assert gemma2.tie_word_embeddings and (gemma2.attention_softcap, gemma2.final_softcap) == (50.0, 30.0)
    assert gemma2.attention_scale == 256**-0.5
    assert gemma2.layer_sliding_windows == (4096, None, 4096, None)
    gemma = ModelConfig.from_dict(dict(model_type="gemma", hidden_act="gelu", num_hidden_layers=2))
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.tie_word_embeddings
