"""`OutputProcessor`: what the engine core reports for a step, turned into each request's outputs.

For every request it keeps an incremental detokenizer, the stop strings (`TextAccumulator`: text
that may begin one is held back, so a stream never shows what the final output cuts), the texts and
offsets of its log-probabilities (`LogprobTexts`) and the channel its `RequestOutput` deltas leave
through. A channel merges deltas while its consumer is busy, so a slow consumer costs one pending
output, not a backlog.

The core speaks of sequences, this module of requests; stop strings are found here, so `process`
returns the sequences they ended, for the core to finish.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .core import CoreOutputs
from .detokenizer import IncrementalDetokenizer, TextAccumulator, make_decode_fn
from .logprobs import Decode, LogprobTexts
from .outputs import RequestOutput, TokenLogprob
from .plan import SampleLogprobs
from .sequence import FinishReason, Sequence


class RequestChannel:
    """Outputs of one request, merged while the consumer is busy (no unbounded backlog)."""

    def __init__(self, request_id: str, prompt_tokens: int, *, logprobs: bool = False):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self._generated = 0
        self._finish: str | None = None
        self._stop_reason: str | int | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.closed = False
        self.cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # for the first output
        self.prompt_text: str | None = None  # with prompt_logprobs, for the first output

    def put(
        self,
        text: str,
        token_ids: list[int],
        generated: int,
        finish: str | None = None,
        *,
        logprob: TokenLogprob | None = None,
        stop_reason: str | int | None = None,
    ) -> None:
        if self.closed:
            return
        if text:
            self._text.append(text)
        self._token_ids.extend(token_ids)
        if logprob is not None and self._logprobs is not None:
            self._logprobs.append(logprob)
        self._generated = generated
        if finish is not None:
            self._finish = finish
            self._stop_reason = stop_reason
            self.closed = True
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        if not self.closed:
            self._error = error
            self.closed = True
            self._ready.set()

    async def get(self) -> RequestOutput:
        """The outputs since the last call, merged; raises the request's error after its last output."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None and not self._text and not self._token_ids:
            raise self._error
        out = RequestOutput(
            request_id=self.request_id,
            text="".join(self._text),
            token_ids=self._token_ids,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self._generated,
            finish_reason=self._finish,
            logprobs=self._logprobs,
            stop_reason=self._stop_reason,
            cached_tokens=self.cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
            prompt_text=self.prompt_text,
        )
        self.prompt_logprobs = self.prompt_text = None
        self._text, self._token_ids = [], []
        if self._logprobs is not None:
            self._logprobs = []
        if self._error is not None:
            self._ready.set()  # the error comes with the next get()
        return out


class RequestState:
    """The output side of one request."""

    def __init__(self, request_id: str, seq: Sequence, decode: Decode, decode_special: Decode):
        params = seq.params
        self.request_id = request_id
        self.seq = seq
        self.channel = RequestChannel(request_id, seq.prompt_len, logprobs=params.logprobs is not None)
        self.detokenizer = IncrementalDetokenizer(
            decode if params.skip_special_tokens else decode_special, seq.token_ids
        )
        self.text = TextAccumulator(params.stop, include_stop=params.include_stop_str_in_output)
        self.logprobs = LogprobTexts(decode, decode_special)
        self.first_token_s: float | None = None


class OutputProcessor:
    """The output side of every request of one engine."""

    def __init__(self, tokenizer: Any):
        self._decode = make_decode_fn(tokenizer)
        self._decode_special = make_decode_fn(tokenizer, skip_special_tokens=False)  # logprob texts
        self.requests: dict[str, RequestState] = {}
        self._by_seq: dict[int, RequestState] = {}  # seq_id -> request: the core holds no back-references

    def add(self, request_id: str, seq: Sequence) -> RequestState:
        request = RequestState(request_id, seq, self._decode, self._decode_special)
        self.requests[request_id] = request
        self._by_seq[seq.seq_id] = request
        return request

    def process(self, outputs: CoreOutputs) -> list[Sequence]:
        """Deliver a step's outputs to the requests; returns the sequences stop strings ended."""
        for seq, start_position, targets, samples in outputs.prompt_scores:
            request = self._by_seq.get(seq.seq_id)
            if request is not None:
                request.logprobs.score_prompt(seq.token_ids, start_position, targets, samples)
        for seq, error in outputs.failed:
            request = self._by_seq.get(seq.seq_id)
            if request is not None:
                request.channel.fail(error)
                self.forget(request)
        stopped = []
        for seq, token, reason, sample in outputs.sampled:
            if self._deliver(seq, token, reason, sample):
                stopped.append(seq)
        return stopped

    def _deliver(
        self, seq: Sequence, token: int, reason: FinishReason | None, sample: SampleLogprobs | None
    ) -> bool:
        """Detokenize ``token``, apply stop strings and hand the delta to the request; True when a
        stop string ended it."""
        request = self._by_seq.get(seq.seq_id)
        if request is None:
            return False  # aborted meanwhile
        if request.first_token_s is None:
            request.first_token_s = time.monotonic()
            request.channel.cached_tokens = seq.num_cached_tokens
            if seq.params.prompt_logprobs is not None:
                request.channel.prompt_logprobs = [None, *request.logprobs.prompt]
                request.channel.prompt_text = request.logprobs.prompt_text(seq.token_ids)
        if reason is FinishReason.STOP and not seq.params.include_stop_str_in_output:
            delta = request.detokenizer.flush()  # a stop token (EOS too) ends the text unseen
        else:
            delta = request.detokenizer.add(token)
            if reason is not None:
                delta += request.detokenizer.flush()
        logprob = None
        if sample is not None:
            logprob = request.logprobs.generated(seq.token_ids, sample, len(request.text.text), len(delta))
        visible, stopped = request.text.push(delta, final=reason is not None)
        stop_reason: str | int | None = None
        if stopped:
            reason = FinishReason.STOP
            stop_reason = request.text.stopped_by
        elif reason is FinishReason.STOP:
            stop_reason = seq.stop_token_reason()
        finish = reason.value if reason is not None else None
        request.channel.put(
            visible, [token], seq.num_generated, finish, logprob=logprob, stop_reason=stop_reason
        )
        if reason is not None:
            self.forget(request)
        return stopped

    def abort(self, request: RequestState) -> None:
        """End ``request``'s stream with ``finish_reason="abort"``."""
        request.channel.put("", [], request.seq.num_generated, FinishReason.ABORT.value)
        self.forget(request)

    def abort_all(self) -> None:
        for request in list(self.requests.values()):
            self.abort(request)

    def fail_all(self, error: BaseException) -> None:
        for request in self.requests.values():
            request.channel.fail(error)
        self.requests.clear()
        self._by_seq.clear()

    def forget(self, request: RequestState) -> None:
        self.requests.pop(request.request_id, None)
        self._by_seq.pop(request.seq.seq_id, None)
