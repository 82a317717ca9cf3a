"""Log-probability texts and text offsets, in one place.

The runner reports numbers (`SampleLogprobs`: the sampled token's raw log-probability and the N
likeliest ids). `LogprobTexts` turns them into one request's `TokenLogprob` entries as the
`OutputProcessor` delivers its tokens:

- texts: a token (and each alternative) reads as the text it adds after the `LOGPROB_TEXT_CONTEXT`
  tokens before it, special tokens spelled out;
- a generated token's offset counts in the generated text: its text ends the delta it completed,
  but it never begins before that delta does (a token that ends inside a character adds nothing
  until the character completes; a special token is not in the text);
- a prompt token's offset counts in the prompt read back token by token (`prompt_text`).

Whoever shows log-probabilities beside text takes its view here as well: `VisibleLogprobs` releases
entries with the text they describe (the engine holds back text that may begin a stop string, and
its tokens wait with it; a stop string's cut leaves out the tokens past it), and `shift_offsets`
counts offsets in a longer text (an echoed prompt before the generated text).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING

import msgspec

from .detokenizer import IncrementalDetokenizer, token_texts
from .outputs import RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from .plan import SampleLogprobs

LOGPROB_TEXT_CONTEXT = 6  # tokens before a position that its logprob texts are decoded after

Decode = Callable[[SequenceOf[int]], str]


class LogprobTexts:
    """One request's log-probability entries: its prompt's, scored in order as the prompt is
    computed, and one per generated token."""

    def __init__(self, decode: Decode, decode_special: Decode):
        self._decode = decode  # reads the prompt: its entries' offsets count in that text
        self._decode_special = decode_special  # reads the entries' own texts
        self.prompt: list[TokenLogprob] = []  # positions 1.. so far
        self._prompt_reader: IncrementalDetokenizer | None = None
        self._prompt_pieces: list[str] = []  # the prompt's text read so far, token by token
        self._prompt_length = 0  # of that text

    def score_prompt(
        self, token_ids: list[int], start_position: int, targets: list[int], samples: list[SampleLogprobs]
    ) -> None:
        """Keep the log-probabilities of ``targets``, the prompt tokens after positions
        ``start_position``.., each position once and in order (a preempted sequence scores its
        prompt again as it recomputes it)."""
        for offset, (target, sample) in enumerate(zip(targets, samples)):
            position = start_position + offset + 1  # of the token scored
            if position == len(self.prompt) + 1:
                self.prompt.append(self._prompt_entry(token_ids, position, target, sample))

    def prompt_text(self, token_ids: list[int]) -> str:
        """The prompt's text as its entries' offsets count it (read token by token); once, when the
        first output leaves."""
        if self._prompt_reader is None:  # one token: nothing was scored
            return self._decode(token_ids[:1])
        return "".join(self._prompt_pieces) + self._prompt_reader.flush()

    def generated(
        self, token_ids: list[int], sample: SampleLogprobs, text_length: int, delta_length: int
    ) -> TokenLogprob:
        """The entry of the last of ``token_ids``, just generated. The generated text had
        ``text_length`` characters before the token and ``delta_length`` more after it (more than
        the token's own when it completes a character that earlier tokens began, none while a
        character is incomplete)."""

        def offset(text: str) -> int:
            return max(text_length, text_length + delta_length - len(text))

        return self._entry(token_ids, len(token_ids) - 1, token_ids[-1], sample, offset)

    def _prompt_entry(
        self, token_ids: list[int], position: int, token: int, sample: SampleLogprobs
    ) -> TokenLogprob:
        """Positions come in order, so the prompt's text is read once, token by token."""
        if self._prompt_reader is None:
            self._prompt_reader = IncrementalDetokenizer(self._decode, [])
            self._prompt_pieces.append(self._prompt_reader.add(token_ids[0]))
            self._prompt_length = len(self._prompt_pieces[0])
        text_offset = self._prompt_length
        self._prompt_pieces.append(self._prompt_reader.add(token))
        self._prompt_length += len(self._prompt_pieces[-1])
        return self._entry(token_ids, position, token, sample, lambda _: text_offset)

    def _entry(
        self,
        token_ids: list[int],
        position: int,
        token: int,
        sample: SampleLogprobs,
        text_offset: Callable[[str], int],
    ) -> TokenLogprob:
        """``sample`` for ``token`` at ``position`` of ``token_ids``, with the texts of the token and
        its alternatives; ``text_offset`` maps the token's text to where it begins."""
        context = token_ids[max(0, position - LOGPROB_TEXT_CONTEXT) : position]
        alternatives = [t for t in sample.top_ids if t != token]
        texts = token_texts(self._decode_special, context, [token, *alternatives])
        text_of = dict(zip([token, *alternatives], texts))
        return TokenLogprob(
            token_id=token,
            logprob=sample.logprob,
            top=dict(zip(sample.top_ids, sample.top_logprobs)),
            text=texts[0],
            top_text={t: text_of[t] for t in sample.top_ids},
            text_offset=text_offset(texts[0]),
        )


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
