"""The prompt types and their tokenization moved to `fastgen.inputs`; these names stay importable
from here for the modules not yet updated (`serving/protocol.py`, `cli.py`, the examples)."""

from __future__ import annotations

from fastgen.inputs import ChatMessage, ChatPrompt, Prompt, prompt_token_ids

__all__ = ["ChatMessage", "ChatPrompt", "Prompt", "prompt_token_ids"]
