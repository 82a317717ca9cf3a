"""Incremental detokenization and stop strings, per request.

Text is decoded over a short window of recent tokens, so each step costs the same whatever the
length; a delta ending in an incomplete UTF-8 character (U+FFFD) is held back until the
character completes. Text that might be the start of a stop string is held back as well, so a
stream never shows what the final output cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_WINDOW = 6  # tokens of context before the new ones; enough for merges and leading spaces


def make_decode_fn(tokenizer, *, skip_special_tokens: bool = True) -> Callable[[Sequence[int]], str]:
    """A fast ``ids -> text`` for ``tokenizer`` (the Rust tokenizer directly when there is one)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def token_texts(
    decode: Callable[[Sequence[int]], str], context: Sequence[int], token_ids: Sequence[int]
) -> list[str]:
    """How each of ``token_ids`` reads right after ``context`` (a few preceding tokens, which
    settle merges and leading spaces): the text that ``context + [token]`` adds to ``context``."""
    context = list(context)
    before = decode(context)
    texts = []
    for token_id in token_ids:
        full = decode([*context, token_id])
        # when the context ends inside a character that the token completes, ``before`` ends in
        # U+FFFD where ``full`` has the character: the token's text starts where they differ
        common = len(before) if full.startswith(before) else _common_prefix_length(before, full)
        texts.append(full[common:])
    return texts


def _common_prefix_length(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_token_ids: Sequence[int]):
        self._decode = decode
        self._ids: list[int] = list(prompt_token_ids[-_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > 4 * _WINDOW:  # keep the buffer short
            drop = self._prefix_offset - _WINDOW
            del self._ids[:drop]
            self._prefix_offset -= drop
            self._read_offset -= drop
        return delta

    def flush(self) -> str:
        """Whatever text is still held back (at the end of generation)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class TextAccumulator:
    """The generated text of one request, with stop strings applied.

    `push` returns the text that may be shown now, and whether a stop string ended generation. The
    text is cut before the stop string, or after it with ``include_stop``.
    """

    def __init__(self, stop: Sequence[str], *, include_stop: bool = False):
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.stopped_by: str | None = None  # the stop string that ended generation
        self._emitted = 0

    def push(self, delta: str, *, final: bool = False) -> tuple[str, bool]:
        if not delta and not final:
            return "", False
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += delta
        if self.stop:
            cut = self._find_stop(search_from)
            if cut is not None:
                self.text = self.text[:cut]
                return self._take(len(self.text)), True
        visible = len(self.text) if final else len(self.text) - self._held_back()
        return self._take(visible), False

    def _find_stop(self, start: int) -> int | None:
        hits = [(self.text.find(stop, start), stop) for stop in self.stop]
        found = [hit for hit in hits if hit[0] >= 0]
        if not found:
            return None
        cut, self.stopped_by = min(found, key=lambda hit: hit[0])
        return cut + len(self.stopped_by) if self.include_stop else cut

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        text = self.text
        for length in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
