"""`AsyncEngine`: the engine inside the host's event loop, a thin shell over three parts.

- `InputProcessor` (`fastgen.inputs`): checks a request and reads its prompt into token ids.
- `EngineCore` (`fastgen.core`): the scheduler and the executor, one step at a time.
- `OutputProcessor` (`fastgen.output_processor`): each step's tokens turned into the requests'
  outputs (text, stop strings, log-probabilities), which leave through per-request channels.

One background task (the step loop) drives the core; `add_request` and `abort` run between its
steps, on the same thread, so nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceOf
from pathlib import Path
from typing import Any

from .config import EngineConfig
from .core import CoreOutputs, EngineCore, StepProfile
from .errors import EngineDeadError, InvalidRequestError
from .executor import Executor, create_executor
from .heap import hold_frozen_heap, release_frozen_heap
from .inputs import InputProcessor, Prompt
from .models import check_supported
from .models.checkpoint import load_tokenizer, resolve_model
from .models.config import ModelConfig
from .output_processor import OutputProcessor, RequestState
from .outputs import EngineStats, RequestOutput
from .plan import StepResult
from .sampling_params import SamplingParams
from .scheduler import ScheduledStep, Scheduler
from .sequence import FinishReason
from .streams import output_stream

logger = logging.getLogger("fastgen.engine")

__all__ = ["AsyncEngine", "EngineStats", "StepProfile"]


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
        self.max_model_len = max_model_len
        self.eos_token_ids = _eos_token_ids(model_path, model_config, tokenizer)
        self.inputs = InputProcessor(
            tokenizer, vocab_size=model_config.vocab_size, max_model_len=max_model_len
        )
        self.core = EngineCore(config, executor, self.eos_token_ids)
        self.outputs = OutputProcessor(tokenizer)
        self.profile = StepProfile()
        self._wakeup = asyncio.Event()
        self._dead: BaseException | None = None
        self._stopping = False
        if config.freeze_gc:
            hold_frozen_heap()  # the loaded engine's objects, out of the collector's full scans
        self._loop_task = asyncio.get_running_loop().create_task(self._step_loop(), name="fastgen-step-loop")

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
        # the tokenizer loads on a thread of its own while the executor loads the weights
        tokenizer_source = config.tokenizer or model_path
        tokenizer_load = asyncio.ensure_future(asyncio.to_thread(_load_tokenizer, tokenizer_source))
        try:
            executor = await create_executor(model_path, config, model_config, max_model_len)
        except BaseException:
            tokenizer_load.cancel()  # its thread finishes unwatched; nothing waits for it
            raise
        try:
            tokenizer = await tokenizer_load
        except BaseException:
            await executor.shutdown()
            raise
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
        self.outputs.abort_all()
        try:
            await self.executor.shutdown()
        finally:
            if self.config.freeze_gc:
                release_frozen_heap()

    @property
    def is_healthy(self) -> bool:
        running = self._dead is None and not self._stopping and not self._loop_task.done()
        return running and self.executor.is_alive

    def stats(self) -> EngineStats:
        return self.core.stats()

    # -- requests -------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt | SequenceOf[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Generate from ``prompt`` (text or token ids); yields `RequestOutput` deltas.

        Leaving the iteration early (``break``, cancellation, ``aclose``) aborts the request and
        frees its KV blocks within one step. Invalid input raises `InvalidRequestError`.
        """
        request = self.add_request(prompt, params, request_id=request_id)

        def close(cancel: bool) -> None:
            if cancel:
                self.abort(request.request_id)

        async with contextlib.aclosing(output_stream(request.channel.get, close)) as outputs:
            async for out in outputs:
                yield out

    def add_request(
        self,
        prompt: Prompt | SequenceOf[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestState:
        """Validate and queue a request; `generate` is the usual way in."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError(f"the engine is not running: {self._dead or 'stopped'}")
        params = params if params is not None else SamplingParams()
        prompt_ids, max_total_tokens = self.inputs.validate(prompt, params)
        self.core.check_capacity()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.outputs.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        request = self.outputs.add(request_id, self.core.add(prompt_ids, params, max_total_tokens))
        self._wakeup.set()
        return request

    def validate_request(self, prompt: Prompt | SequenceOf[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or `InvalidRequestError` naming what is wrong with the request."""
        return self.inputs.validate(prompt, params)[0]

    def abort(self, request_id: str) -> None:
        """Abort a request; its iterator ends with ``finish_reason="abort"``. Unknown and finished
        requests are ignored."""
        request = self.outputs.requests.get(request_id)
        if request is not None:
            self.core.finish(request.seq, FinishReason.ABORT)
            self.outputs.abort(request)

    def tokenize(self, text: str) -> list[int]:
        return self.inputs.tokenize(text)

    # -- the step loop --------------------------------------------------------------------

    async def _step_loop(self) -> None:
        """Run steps back to back: wait for the oldest step in flight, let the core update from it
        and launch the next, then deliver its outputs while the next runs."""
        core = self.core
        try:
            while True:
                core.launch()
                future = core.next_result
                if future is None:
                    if core.has_work:  # nothing in flight and nothing can run
                        self._deliver(core.fail_unschedulable())
                        await asyncio.sleep(0)
                    else:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    continue
                with contextlib.suppress(Exception):  # the core reads a failure from the future
                    await future
                self._deliver(core.step())
                await asyncio.sleep(0)  # let consumers run between steps
        except asyncio.CancelledError:
            core.abandon()
            raise
        except BaseException as exc:
            core.abandon()
            self._die(exc)
            raise

    def _deliver(self, outputs: CoreOutputs) -> None:
        for seq in self.outputs.process(outputs):
            self.core.finish(seq, FinishReason.STOP)  # ended by a stop string
        if outputs.fatal is not None:
            raise outputs.fatal
        self.profile.add(outputs, time.perf_counter())

    def _die(self, exc: BaseException) -> None:
        logger.error("engine step loop stopped: %r", exc)
        self._dead = exc
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine stopped: {exc!r}")
        self.outputs.fail_all(error)

    # -- parts, for tests and metrics -------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.inputs.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:  # prompts are read with the new one (detokenizing is not)
        self.inputs.tokenizer = tokenizer

    @property
    def executor(self) -> Executor:
        return self.core.executor

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def step_listeners(self) -> list[Callable[[ScheduledStep, StepResult, float], None]]:
        """Callables ``(step, result, seconds)`` told of each step's result (see `EngineCore`)."""
        return self.core.step_listeners


def _load_tokenizer(path: str) -> Any:
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
