"""`AsyncEngine`: the engine inside the host's event loop.

One background task (the step loop) owns the scheduler, the sequences and the executor: requests
and aborts reach it through an inbox, outputs leave through per-request channels. Nothing in the
core needs a lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, TextAccumulator, make_decode_fn, token_texts
from .errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    StepError,
)
from .executor import Executor, create_executor
from .models import check_supported
from .models.checkpoint import load_tokenizer, resolve_model
from .models.config import ModelConfig
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .plan import SampleLogprobs, StepResult
from .sampling_params import SamplingParams, check_token_ids
from .scheduler import ScheduledStep, Scheduler
from .sequence import FinishReason, Sequence

logger = logging.getLogger("fastgen.engine")

_InFlight = tuple[ScheduledStep, asyncio.Future, float]  # a step, its result, when it was submitted

LOGPROB_TEXT_CONTEXT = 6  # tokens before a position that its logprob texts are decoded after


class _Channel:
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


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    channel: _Channel
    detokenizer: IncrementalDetokenizer
    text: TextAccumulator
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # positions 1.. so far
    prompt_reader: IncrementalDetokenizer | None = None  # reads the prompt scored so far
    prompt_text_length: int = 0  # of that text
    prompt_pieces: list[str] = field(default_factory=list)  # that text


@dataclass
class StepProfile:
    """Where step time goes, summed over steps: the runner's host preparation and its forward
    (launch, device work, wait for the sampled ids), and the engine's host work between a
    step's result and the next launch (on the critical path) or overlapped with the next step."""

    steps: int = 0
    tokens: int = 0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    between_steps_s: float = 0.0
    overlapped_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        per_step = 1e3 / max(self.steps, 1)
        return {
            "steps": self.steps,
            "tokens_per_step": self.tokens / max(self.steps, 1),
            "runner_prepare_ms": self.prepare_s * per_step,
            "runner_forward_ms": self.forward_s * per_step,
            "engine_between_steps_ms": self.between_steps_s * per_step,
            "engine_overlapped_ms": self.overlapped_s * per_step,
        }


class AsyncEngine:
    """An LLM engine living in the host's event loop.

    Create it with ``await AsyncEngine.start(model_path, EngineConfig(...))`` and use it as an
    async context manager, or call `stop` yourself. `generate` may be called from any number of
    tasks at once.
    """

    def __init__(
        self,
        model_path: str,
        config: EngineConfig,
        model_config: ModelConfig,
        tokenizer: Any,
        executor: Executor,
        max_model_len: int,
    ):
        self.model_path = model_path
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.executor = executor
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(
            executor.num_kv_blocks, config.block_size, prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, token_budget=config.token_budget, max_seqs=config.max_seqs
        )
        self.eos_token_ids = _eos_token_ids(model_path, model_config, tokenizer)
        self._decode = make_decode_fn(tokenizer)
        self._decode_special = make_decode_fn(tokenizer, skip_special_tokens=False)  # logprob texts
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}  # seq_id -> request: the core holds no back-references
        self._inbox_add: list[_Request] = []
        self._inbox_abort: list[str] = []
        self._wakeup = asyncio.Event()
        self._seq_ids = itertools.count()
        self._dead: BaseException | None = None
        self._stopping = False
        self.num_steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.kernel_compiles = 0
        # callables(step, seconds) for metrics; seconds run from when the step could start (its submission,
        # or the return of the step it was queued behind) to its result
        self.step_listeners: list[Any] = []
        self.profile = StepProfile()
        self._loop_task = asyncio.get_running_loop().create_task(self._step_loop(), name="fastgen-step-loop")

    # -- life cycle -----------------------------------------------------------------------

    @classmethod
    async def start(
        cls, model: str | Path | None = None, config: EngineConfig | None = None, **options: Any
    ) -> AsyncEngine:
        """Load ``model`` (a local Hugging Face directory or a GGUF file; None: the default model,
        see `fastgen.models.default`) and start the step loop.

        ``options`` are `EngineConfig` fields, for callers that do not build one.
        """
        if config is None:
            config = EngineConfig.from_options(**options)
        elif options:
            config = config.replace(**options)
        model_path = await asyncio.to_thread(resolve_model, model, config.load_format)
        model_config = await asyncio.to_thread(ModelConfig.from_pretrained, model_path)  # GGUF: seconds
        check_supported(model_config)  # fail fast, before loading anything
        max_model_len = config.max_model_len or model_config.max_position_embeddings
        tokenizer = await asyncio.to_thread(_load_tokenizer, config.tokenizer or model_path)
        executor = await create_executor(model_path, config, model_config, max_model_len)
        capacity = executor.num_kv_blocks * config.block_size
        if capacity < max_model_len:
            logger.warning(
                "KV cache holds %d tokens, fewer than max_model_len=%d: limiting max_model_len",
                capacity,
                max_model_len,
            )
            max_model_len = capacity
        logger.info(
            "engine ready: %d KV blocks of %d tokens (%d tokens), max_model_len=%d",
            executor.num_kv_blocks,
            config.block_size,
            capacity,
            max_model_len,
        )
        return cls(model_path, config, model_config, tokenizer, executor, max_model_len)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Abort every request, stop the step loop and release the executor."""
        if self._stopping:
            return
        self._stopping = True
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._loop_task
        for request in list(self._requests.values()):
            request.channel.put("", [], request.seq.num_generated, FinishReason.ABORT.value)
        self._requests.clear()
        self._by_seq.clear()
        await self.executor.shutdown()

    @property
    def is_healthy(self) -> bool:
        return (
            self._dead is None
            and not self._stopping
            and not self._loop_task.done()
            and self.executor.is_alive
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=self.block_manager.num_blocks,
            num_free_kv_blocks=self.block_manager.num_free,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            prefix_cache_hit_tokens=self.scheduler.num_cached_tokens,
            kernel_compiles=self.kernel_compiles,
        )

    # -- requests -------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Generate from ``prompt`` (text or token ids); yields `RequestOutput` deltas.

        Leaving the iteration early (``break``, cancellation, ``aclose``) aborts the request and
        frees its KV blocks within one step. Invalid input raises `InvalidRequestError`.
        """
        request = self.add_request(prompt, params, request_id=request_id)
        finished = False
        try:
            while True:
                out = await request.channel.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def add_request(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> _Request:
        """Validate and queue a request; `generate` is the usual way in."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError(f"the engine is not running: {self._dead or 'stopped'}")
        params = params if params is not None else SamplingParams()
        prompt_ids = self.validate_request(prompt, params)
        max_total = self._max_total_tokens(len(prompt_ids), params)
        # requests in the inbox that the next step can start running do not count as queued
        scheduler = self.scheduler
        free_slots = max(0, scheduler.max_running - scheduler.num_running - scheduler.num_waiting)
        queued = self.scheduler.num_waiting + max(0, len(self._inbox_add) - free_slots)
        if queued >= self.config.max_queued_requests:
            raise EngineOverloadedError(
                f"{queued} requests are waiting (max_queued_requests={self.config.max_queued_requests})"
            )
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        seq = Sequence(
            next(self._seq_ids),
            prompt_ids,
            params,
            max_total_tokens=max_total,
            eos_token_ids=self.eos_token_ids,
        )
        request = _Request(
            request_id=request_id,
            seq=seq,
            channel=_Channel(request_id, len(prompt_ids), logprobs=params.logprobs is not None),
            detokenizer=IncrementalDetokenizer(
                self._decode if params.skip_special_tokens else self._decode_special, prompt_ids
            ),
            text=TextAccumulator(params.stop, include_stop=params.include_stop_str_in_output),
        )
        self._requests[request_id] = request
        self._by_seq[seq.seq_id] = request
        self._inbox_add.append(request)
        self._wakeup.set()
        return request

    def validate_request(self, prompt: str | SequenceOf[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or `InvalidRequestError` naming what is wrong with the request."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"expected SamplingParams, got {type(params).__name__}")
        params.validate(vocab_size=self.model_config.vocab_size)
        if isinstance(prompt, list):  # a prompt too long is refused before its ids are read
            self._max_total_tokens(len(prompt), params)
        prompt_ids = self._prompt_token_ids(prompt)
        self._max_total_tokens(len(prompt_ids), params)
        return prompt_ids

    def abort(self, request_id: str) -> None:
        """Abort a request; its iterator ends with ``finish_reason="abort"``."""
        if request_id in self._requests:
            self._inbox_abort.append(request_id)
            self._wakeup.set()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _prompt_token_ids(self, prompt: str | SequenceOf[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "the prompt is empty")
            ids = self.tokenize(prompt)
        elif isinstance(prompt, SequenceOf) and not isinstance(prompt, bytes | bytearray):
            ids = list(prompt)
            check_token_ids("prompt", ids, self.model_config.vocab_size)
        else:
            raise InvalidRequestError(
                "prompt", f"expected a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return ids

    def _max_total_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        if prompt_len >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"the prompt has {prompt_len} tokens; the context holds {self.max_model_len} "
                "(prompt + at least one generated token)",
            )
        limit = self.max_model_len
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

    # -- the step loop --------------------------------------------------------------------

    def _apply_inbox(self) -> None:
        for request in self._inbox_add:
            if request.request_id in self._requests:  # not aborted while in the inbox
                self.scheduler.add(request.seq)
                self.prompt_tokens += request.seq.prompt_len
        self._inbox_add.clear()
        for request_id in self._inbox_abort:
            request = self._requests.get(request_id)
            if request is not None:
                self._forget(request)
                self.scheduler.finish(request.seq, FinishReason.ABORT)
                request.channel.put("", [], request.seq.num_generated, FinishReason.ABORT.value)
        self._inbox_abort.clear()

    async def _step_loop(self) -> None:
        """Run steps back to back. While step N+1 runs on the device, the host detokenizes and
        delivers step N's tokens; only the cheap token-level stop checks (EOS, lengths) stay
        between the two steps. A sequence that a stop string ends meanwhile computes one wasted
        token in step N+1, which `Scheduler.commit` drops.

        With ``async_scheduling``, step N+1 is planned and submitted while step N runs (the
        workers fill in N's tokens), so two steps are in flight and the next one is queued on the
        worker before the current one ends."""
        ahead = 2 if self.config.async_scheduling else 1  # steps in flight at most
        in_flight: collections.deque[_InFlight] = collections.deque()
        last_received = 0.0  # a step queued behind another only starts once that one is back
        try:
            while True:
                self._apply_inbox()
                if not in_flight:
                    if not self.scheduler.has_work:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                        continue
                    launched = self._launch_next()
                    if launched is None:
                        self._fail_unschedulable()
                        await asyncio.sleep(0)
                        continue
                    in_flight.append(launched)
                self._launch_ahead(in_flight, ahead)
                step, future, started = in_flight.popleft()
                try:
                    result = await future
                except Exception as exc:
                    self._fail_step(step, exc)
                    if not self.executor.is_alive:
                        raise EngineDeadError(f"the executor died: {exc}") from exc
                    continue
                received = time.perf_counter()
                self.num_steps += 1
                if result.prompt_logprobs is not None:
                    self._collect_prompt_logprobs(step, result.prompt_logprobs)
                sampled = []
                logprobs = _logprobs_by_seq(step, result)
                for seq, token in self.scheduler.commit(step, result):
                    reason = seq.token_stop_reason()
                    if reason is not None:
                        self.scheduler.finish(seq, reason)
                    sampled.append((seq, token, reason, logprobs.get(seq.seq_id)))
                for listener in self.step_listeners:
                    listener(step, received - max(started, last_received))
                last_received = received
                self._apply_inbox()
                self._launch_ahead(in_flight, ahead)
                launched_s = time.perf_counter()
                for seq, token, reason, token_logprobs in sampled:
                    self._deliver(seq, token, reason, token_logprobs)
                self._record(step, result, launched_s - received, time.perf_counter() - launched_s)
                await asyncio.sleep(0)  # let consumers run between steps
        except asyncio.CancelledError:
            _abandon(in_flight)
            raise
        except BaseException as exc:
            _abandon(in_flight)
            self._die(exc)
            raise

    def _launch_ahead(self, in_flight: collections.deque[_InFlight], ahead: int) -> None:
        """Submit steps until ``ahead`` are in flight or nothing more can be scheduled yet."""
        while len(in_flight) < ahead and self.scheduler.has_work:
            launched = self._launch_next()
            if launched is None:
                return
            in_flight.append(launched)

    def _record(self, step: ScheduledStep, result: StepResult, between_s: float, overlapped_s: float) -> None:
        profile = self.profile
        profile.steps += 1
        profile.tokens += step.plan.num_tokens
        profile.prepare_s += result.prepare_s
        profile.forward_s += result.forward_s
        profile.between_steps_s += between_s
        profile.overlapped_s += overlapped_s
        self.kernel_compiles += result.kernel_compiles

    def _launch_next(self) -> _InFlight | None:
        """Schedule a step and start it on the executor right away (no await in between); None
        when nothing can run now."""
        step = self.scheduler.schedule()
        if not step.plan.chunks:
            return None
        return step, self.executor.submit(step.plan), time.perf_counter()

    def _die(self, exc: BaseException) -> None:
        logger.error("engine step loop stopped: %r", exc)
        self._dead = exc
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine stopped: {exc!r}")
        for request in self._requests.values():
            request.channel.fail(error)
        self._requests.clear()
        self._by_seq.clear()

    def _fail_step(self, step: ScheduledStep, exc: Exception) -> None:
        logger.exception("step %d failed; failing its %d requests", step.plan.step_id, len(step.sequences))
        error = StepError(f"a forward step failed: {exc!r}")
        for seq in step.sequences:
            request = self._request_of(seq)
            if request is not None:
                self.scheduler.finish(seq, FinishReason.ERROR)
                request.channel.fail(error)
                self._forget(request)

    def _fail_unschedulable(self) -> None:
        # With no step in flight, only reachable when the head of the queue cannot fit an empty
        # cache, which the admission checks rule out; fail it rather than spin.
        if self.scheduler.running or not self.scheduler.waiting:
            return
        seq = self.scheduler.waiting[0]
        request = self._request_of(seq)
        self.scheduler.finish(seq, FinishReason.ERROR)
        if request is not None:
            request.channel.fail(InvalidRequestError("prompt", "the prompt does not fit the KV cache"))
            self._forget(request)

    def _deliver(
        self, seq: Sequence, token: int, reason: FinishReason | None, sample: SampleLogprobs | None
    ) -> None:
        """Detokenize ``token``, apply stop strings and hand the delta to the request."""
        request = self._request_of(seq)
        if request is None:
            return  # aborted meanwhile
        self.generated_tokens += 1
        if request.first_token_s is None:
            request.first_token_s = time.monotonic()
            request.channel.cached_tokens = seq.num_cached_tokens
            if seq.params.prompt_logprobs is not None:
                request.channel.prompt_logprobs = [None, *request.prompt_logprobs]
                request.channel.prompt_text = self._prompt_text(request)
        if reason is FinishReason.STOP and not seq.params.include_stop_str_in_output:
            delta = request.detokenizer.flush()  # a stop token (EOS too) ends the text unseen
        else:
            delta = request.detokenizer.add(token)
            if reason is not None:
                delta += request.detokenizer.flush()
        logprob = None
        if sample is not None:
            logprob = self._token_logprob(seq, token, sample, len(request.text.text), len(delta))
        visible, stopped = request.text.push(delta, final=reason is not None)
        stop_reason: str | int | None = None
        if stopped:
            reason = FinishReason.STOP
            stop_reason = request.text.stopped_by
            self.scheduler.finish(seq, reason)
        elif reason is FinishReason.STOP:
            stop_reason = seq.stop_token_reason()
        finish = reason.value if reason is not None else None
        request.channel.put(
            visible, [token], seq.num_generated, finish, logprob=logprob, stop_reason=stop_reason
        )
        if reason is not None:
            self._forget(request)

    def _collect_prompt_logprobs(self, step: ScheduledStep, scored: list[list[SampleLogprobs]]) -> None:
        """Keep each prompt position's log-probabilities, once and in order (a preempted sequence
        scores its prompt again as it recomputes it)."""
        rows = iter(scored)
        for chunk, seq, incarnation in zip(step.plan.chunks, step.sequences, step.incarnations):
            if not chunk.prompt_targets:
                continue
            entries = next(rows)
            request = self._request_of(seq)
            if request is None or seq.num_preemptions != incarnation:
                continue
            collected = request.prompt_logprobs
            for offset, (target, sample) in enumerate(zip(chunk.prompt_targets, entries)):
                position = chunk.start_position + offset + 1  # of the token scored
                if position == len(collected) + 1:
                    collected.append(self._prompt_token_logprob(request, position, target, sample))

    def _prompt_token_logprob(
        self, request: _Request, position: int, token: int, sample: SampleLogprobs
    ) -> TokenLogprob:
        """The prompt token at ``position`` scored; positions come in order, so the prompt's text is
        read once, token by token, for the offsets."""
        seq = request.seq
        if request.prompt_reader is None:
            request.prompt_reader = IncrementalDetokenizer(self._decode, [])
            request.prompt_pieces.append(request.prompt_reader.add(seq.token_ids[0]))
            request.prompt_text_length = len(request.prompt_pieces[0])
        text_offset = request.prompt_text_length
        request.prompt_pieces.append(request.prompt_reader.add(token))
        request.prompt_text_length += len(request.prompt_pieces[-1])
        return self._logprob_entry(seq.token_ids, position, token, sample, lambda _: text_offset)

    def _prompt_text(self, request: _Request) -> str:
        """The prompt's text as its log-probabilities' offsets count it (read token by token)."""
        if request.prompt_reader is None:  # one token: nothing was scored
            return self._decode(request.seq.token_ids[:1])
        return "".join(request.prompt_pieces) + request.prompt_reader.flush()

    def _token_logprob(
        self, seq: Sequence, token: int, sample: SampleLogprobs, text_length: int, delta_length: int
    ) -> TokenLogprob:
        """``sample`` with the texts of ``token`` (the sequence's last) and its alternatives, read
        after the tokens before it. The generated text had ``text_length`` characters before the
        token and ``delta_length`` more after it (more than the token's own when it completes a
        character that earlier tokens began, none while a character is incomplete)."""
        # the token's text ends the delta; not before the delta starts (a special token is not in
        # the text, a token that ends in an incomplete character adds nothing to it yet)
        def offset(text: str) -> int:
            return max(text_length, text_length + delta_length - len(text))

        return self._logprob_entry(seq.token_ids, seq.num_tokens - 1, token, sample, offset)

    def _logprob_entry(
        self,
        token_ids: list[int],
        position: int,
        token: int,
        sample: SampleLogprobs,
        text_offset: Callable[[str], int],
    ) -> TokenLogprob:
        """``sample`` for ``token`` at ``position`` of ``token_ids``, with the texts of the token and
        its alternatives read after the tokens before it; ``text_offset`` maps the token's text to
        where it begins."""
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

    def _request_of(self, seq: Sequence) -> _Request | None:
        return self._by_seq.get(seq.seq_id)

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        self._by_seq.pop(request.seq.seq_id, None)


def _abandon(in_flight: collections.deque[_InFlight]) -> None:
    """Cancel steps whose results nobody will read, and mark their errors as seen (an unread
    error is logged when the future is collected, at an arbitrary point of the host's program)."""
    for _, future, _ in in_flight:
        future.cancel()
        future.add_done_callback(_consume_error)
    in_flight.clear()


def _consume_error(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _logprobs_by_seq(step: ScheduledStep, result: StepResult) -> dict[int, SampleLogprobs]:
    """seq_id -> the raw log-probabilities the runner computed for it this step."""
    if result.logprobs is None:
        return {}
    sampling = [seq for chunk, seq in zip(step.plan.chunks, step.sequences) if chunk.sample]
    return {seq.seq_id: row for seq, row in zip(sampling, result.logprobs) if row is not None}


def _load_tokenizer(path: str):
    return load_tokenizer(path)  # GGUF files too


def _eos_token_ids(model_path: str, model_config: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    ids = list(model_config.eos_token_ids)
    generation_config = Path(model_path) / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        for token in eos if isinstance(eos, list) else [eos]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tokenizer_eos, int) and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)
    return tuple(ids)
