"""The ``fastgen`` command's engine flags are generated from `EngineConfig`: every field has a flag
whose help is the field's own documentation, and what a flag sets is what the field gets."""

from __future__ import annotations

import pytest

from fastgen.cli import _engine_options, build_parser
from fastgen.config import EngineConfig, field_docs

# a value for every field's flag (not the default), and what the field then holds
FLAG_VALUES = {
    "tensor_parallel": ("--tensor-parallel", "2", 2),
    "token_budget": ("--token-budget", "64", 64),
    "max_seqs": ("--max-seqs", "8", 8),
    "block_size": ("--block-size", "32", 32),
    "num_kv_blocks": ("--num-kv-blocks", "100", 100),
    "kv_cache_bytes": ("--kv-cache-bytes", "1048576", 1048576),
    "gpu_memory_utilization": ("--gpu-memory-utilization", "0.5", 0.5),
    "max_model_len": ("--max-model-len", "256", 256),
    "dtype": ("--dtype", "float32", "float32"),
    "device": ("--device", "cpu", "cpu"),
    "device_ids": ("--device-ids", "2,3", [2, 3]),
    "load_format": ("--load-format", "dummy", "dummy"),
    "tokenizer": ("--tokenizer", "some/tokenizer", "some/tokenizer"),
    "executor": ("--executor", "zmq", "zmq"),
    "max_queued_requests": ("--max-queued-requests", "10", 10),
    "cuda_graphs": ("--no-cuda-graphs", None, False),
    "async_scheduling": ("--no-async-scheduling", None, False),
    "enable_prefix_caching": ("--no-prefix-caching", None, False),
    "quantization": ("--quantization", "fp8", "fp8"),
    "kv_cache_dtype": ("--kv-cache-dtype", "fp8", "fp8"),
    "seed": ("--seed", "7", 7),
    "cpu_threads": ("--cpu-threads", "3", 3),
    "freeze_gc": ("--no-freeze-gc", None, False),
    "worker_start_timeout_s": ("--worker-start-timeout-s", "12.5", 12.5),
    "step_timeout_s": ("--step-timeout-s", "none", None),
}


def test_every_field_is_documented_and_has_a_flag(capsys):
    fields = set(EngineConfig.__struct_fields__)
    assert set(FLAG_VALUES) == fields  # a new field needs a case here
    docs = field_docs(EngineConfig)
    assert set(docs) == fields and all(len(doc) > 20 for doc in docs.values())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field, (flag, _, _) in FLAG_VALUES.items():
        assert flag in help_text, flag
        first_words = " ".join(docs[field].replace("``", "").replace("`", "").split()[:6])
        assert first_words in help_text, (field, first_words)


@pytest.mark.parametrize("command", [["serve", "model"], ["generate", "model", "prompt"]])
def test_each_flag_sets_its_field(command):
    argv, expected = list(command), {}
    for field, (flag, value, parsed) in FLAG_VALUES.items():
        if command[0] == "generate" and field == "seed":
            continue  # generate's --seed would read as the request's seed: it has --sampling-seed
        argv += [flag] if value is None else [flag, value]
        expected[field] = parsed
    options = _engine_options(build_parser().parse_args(argv))
    assert options == expected
    config = EngineConfig.from_options(**{**options, "tensor_parallel": 2})
    assert all(getattr(config, field) == value for field, value in expected.items())


def test_absent_flags_leave_the_defaults_and_bad_values_are_refused():
    parser = build_parser()
    assert _engine_options(parser.parse_args(["serve", "model"])) == {}
    assert EngineConfig.from_options(**_engine_options(parser.parse_args(["serve"]))) == EngineConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "model", "--token-budget", "many"])
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "model", "prompt", "--seed", "3"])
    with pytest.raises(ValueError, match="dtype must be one of"):  # validated once, by EngineConfig
        EngineConfig.from_options(**_engine_options(parser.parse_args(["serve", "--dtype", "float8"])))
