"""Chat with a model in the terminal; replies stream token by token.

    python examples/terminal_chat.py [MODEL_DIR]

Without MODEL_DIR a tiny random model is built on the fly (it talks nonsense, on a CPU).
The conversation is rendered with the tokenizer's chat template. Ctrl-D quits.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

from fastgen import AsyncEngine, SamplingParams
from fastgen.serving.prompts import ChatMessage, ChatPrompt, prompt_token_ids


async def chat(model: str) -> None:
    params = SamplingParams(max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9)
    history: list[ChatMessage] = []
    async with await AsyncEngine.start(model) as engine:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print()
                return
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
    model = sys.argv[1] if len(sys.argv) > 1 else None
    if model is None:
        from fastgen.toy import make_toy_checkpoint

        model = str(make_toy_checkpoint(tempfile.mkdtemp(prefix="fastgen-toy-")))
    asyncio.run(chat(model))
