"""The start-up warm-up steps through a real runner: every sampling path runs, nothing is left."""

import pytest

from fastgen import EngineConfig, kernels
from fastgen.kernel_warmup import warm_up_steps
from fastgen.models.config import ModelConfig
from fastgen.runner import ModelRunner


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_warm_up_steps_take_every_sampling_path_and_release_their_sequences(
    block_size, llama_path, monkeypatch
) -> None:
    """The greedy argmax (a batch of plain greedy rows), the sampler with log-probabilities and
    the prompt and decode paths run once, at block sizes down to one token a block (the warm-up's
    sequences then span several blocks); the runner holds no sequence afterwards."""
    config = EngineConfig(num_kv_blocks=32, block_size=block_size, max_seqs=4, token_budget=32)
    runner = ModelRunner(llama_path, config, ModelConfig.from_pretrained(llama_path), 64, show_progress=False)
    greedy_calls, sampled_calls = [], []
    argmax, sample_tokens = kernels.greedy_argmax, runner._sample_tokens

    def counting_argmax(logits):
        greedy_calls.append(len(logits))
        return argmax(logits)

    def counting_sampler(logits, states):
        sampled_calls.append(len(states))
        return sample_tokens(logits, states)

    monkeypatch.setattr(kernels, "greedy_argmax", counting_argmax)
    monkeypatch.setattr(runner, "_sample_tokens", counting_sampler)
    results = []
    execute = runner.execute
    warm_up_steps(lambda plan: results.append(execute(plan)), block_size)
    assert greedy_calls == [1]  # the last decode step: the greedy sequence alone
    assert sampled_calls == [2, 2]  # the prompt step and the decode step of both sequences
    assert [len(result.sampled_token_ids) for result in results] == [2, 2, 1, 0]
    assert runner.sequences == {}
