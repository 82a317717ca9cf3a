"""Log-probability texts and text offsets, as consumers show them beside text.

`VisibleLogprobs` releases a request's entries with the text they describe (the engine holds back
text that may begin a stop string, and its tokens wait with it; a stop string's cut leaves out the
tokens past it), and `shift_offsets` counts offsets in a longer text (an echoed prompt before the
generated text).
"""

from __future__ import annotations

import msgspec

from .outputs import RequestOutput, TokenLogprob


class VisibleLogprobs:
    """The log-probabilities of one request, released with the text they describe.

    `push` takes each `RequestOutput` delta and returns the entries to show with its text: those
    whose text begins before the end of the text shown so far. At the end, a stop string's cut
    leaves out the tokens that begin past it; otherwise everything left is released.
    """

    def __init__(self) -> None:
        self._pending: list[TokenLogprob] = []
        self._text_length = 0

    def push(self, output: RequestOutput) -> list[TokenLogprob]:
        self._text_length += len(output.text)
        self._pending.extend(output.logprobs or ())
        if output.finish_reason is not None:
            cut = isinstance(output.stop_reason, str)
            ready = [e for e in self._pending if not cut or e.text_offset < self._text_length]
            self._pending = []
            return ready
        count = 0
        while count < len(self._pending) and self._pending[count].text_offset < self._text_length:
            count += 1
        ready, self._pending = self._pending[:count], self._pending[count:]
        return ready


def shift_offsets(entries: list[TokenLogprob], by: int) -> list[TokenLogprob]:
    """``entries`` with their text offsets counted ``by`` characters later (after an echoed prompt)."""
    return [msgspec.structs.replace(entry, text_offset=entry.text_offset + by) for entry in entries]
