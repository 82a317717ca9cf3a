"""Prompts as they travel through the serving layer: text, token ids, or chat messages.

Chat messages are rendered with the tokenizer's chat template wherever the tokenizer lives (the
engine's process or a deployment's server), so clients never need one. Servers tokenize with
`tokenize_prompt`, which renders and tokenizes long prompts on a small thread pool: a 10 MB prompt
takes seconds to tokenize, and on the event loop it would stall every stream and ``/health``.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from fastgen.errors import InvalidRequestError


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One message of a conversation (content already flattened to text)."""

    role: str
    content: str


class ChatPrompt(msgspec.Struct, tag="chat", forbid_unknown_fields=True):
    """A conversation to be rendered with the model's chat template, ending with the
    assistant's turn."""

    messages: list[ChatMessage]


Prompt = str | list[int] | ChatPrompt

INLINE_PROMPT_CHARS = 1024  # shorter prompts are tokenized on the loop (about a millisecond)
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="fastgen-tokenize")


async def tokenize_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """`prompt_token_ids` off the event loop for all but short prompts. (HF fast tokenizers may be
    called from several threads at once as long as nobody changes their truncation or padding.)"""
    if isinstance(prompt, list) or _prompt_chars(prompt) <= INLINE_PROMPT_CHARS:
        return prompt_token_ids(tokenizer, prompt)
    return await asyncio.get_running_loop().run_in_executor(_POOL, prompt_token_ids, tokenizer, prompt)


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, ChatPrompt):
        return sum(32 + len(message.content) for message in prompt.messages)  # 32: the template's share
    return len(prompt) if isinstance(prompt, str) else 0


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The token ids of ``prompt``: text is tokenized as the engine does (with special tokens),
    chat messages through the tokenizer's chat template."""
    if isinstance(prompt, ChatPrompt):
        return _render_chat(tokenizer, prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, list):
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return prompt
    raise InvalidRequestError(
        "prompt", f"expected text, token ids or chat messages, got {type(prompt).__name__}"
    )


def _render_chat(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    if not prompt.messages:
        raise InvalidRequestError("messages", "the conversation has no messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("messages", "the model's tokenizer has no chat template")
    messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may raise on roles it does not know
        raise InvalidRequestError("messages", f"the chat template rejected the messages: {exc}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
