"""Prompts, and the `InputProcessor` that turns a request's prompt into token ids.

A prompt is text, token ids or a conversation (`ChatPrompt`, rendered with the tokenizer's chat
template wherever the tokenizer lives, so clients never need one). Text is tokenized with special
tokens. Long prompts are read off the event loop (`tokenize_off_loop`): a 10 MB prompt takes seconds
to tokenize, and on the loop it would stall every stream and ``/health``.

`max_total_tokens` is the one rule for how long a request may grow: the engine refuses a request
that breaks it, and the deployment router applies the same rule before it routes.

Nothing here imports torch or the engine: the router's process tokenizes with the same code.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence as SequenceOf
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from .errors import InvalidRequestError
from .sampling_params import SamplingParams, check_token_ids


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


def max_total_tokens(prompt_len: int, params: SamplingParams, max_model_len: int) -> int:
    """How many tokens (prompt and output) a request may hold: the context, ``max_length`` and
    ``prompt_len + max_new_tokens``, whichever is least. Raises `InvalidRequestError` when the
    prompt leaves no room for one generated token."""
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            "prompt",
            f"the prompt has {prompt_len} tokens; the context holds {max_model_len} "
            "(prompt + at least one generated token)",
        )
    limit = max_model_len
    if params.max_length is not None:
        if prompt_len >= params.max_length:
            raise InvalidRequestError(
                "max_length",
                f"max_length ({params.max_length}) must exceed the prompt length ({prompt_len})",
            )
        limit = min(limit, params.max_length)
    if params.max_new_tokens is not None:
        limit = min(limit, prompt_len + params.max_new_tokens)
    return limit


def prompt_token_ids(tokenizer: Any, prompt: Prompt | SequenceOf[int]) -> list[int]:
    """The token ids of ``prompt`` (token ids are taken as they are: the engine checks them
    against the vocabulary)."""
    if isinstance(prompt, ChatPrompt):
        return _render_chat(tokenizer, prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    elif isinstance(prompt, SequenceOf) and not isinstance(prompt, bytes | bytearray):
        ids = list(prompt)
    else:
        raise InvalidRequestError(
            "prompt", f"expected text, token ids or chat messages, got {type(prompt).__name__}"
        )
    if not ids:
        raise InvalidRequestError("prompt", "the prompt is empty")
    return ids


async def tokenize_off_loop(tokenizer: Any, prompt: Prompt | SequenceOf[int]) -> list[int]:
    """`prompt_token_ids`, on a small thread pool for all but short prompts. (HF fast tokenizers
    may be called from several threads at once as long as nobody changes their truncation or
    padding.)"""
    if _prompt_chars(prompt) <= INLINE_PROMPT_CHARS:
        return prompt_token_ids(tokenizer, prompt)
    return await asyncio.get_running_loop().run_in_executor(_POOL, prompt_token_ids, tokenizer, prompt)


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, ChatPrompt):
        return sum(32 + len(message.content) for message in prompt.messages)  # 32: the template's share
    return len(prompt) if isinstance(prompt, str) else 0


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


class InputProcessor:
    """Checks requests against one model (its vocabulary and context) and reads their prompts."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def token_ids(self, prompt: Prompt | SequenceOf[int]) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt)

    def max_total_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        return max_total_tokens(prompt_len, params, self.max_model_len)

    def validate(self, prompt: Prompt | SequenceOf[int], params: SamplingParams) -> tuple[list[int], int]:
        """The prompt's token ids and the most tokens the request may hold, or `InvalidRequestError`
        naming what is wrong with the request."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"expected SamplingParams, got {type(params).__name__}")
        params.validate(vocab_size=self.vocab_size)
        if isinstance(prompt, list):  # a prompt too long is refused before its ids are read
            self.max_total_tokens(len(prompt), params)
        ids = self.token_ids(prompt)
        if not isinstance(prompt, str | ChatPrompt):
            check_token_ids("prompt", ids, self.vocab_size)
        return ids, self.max_total_tokens(len(ids), params)
