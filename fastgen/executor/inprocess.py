"""`InProcessExecutor`: the model runner in the engine's process, on a worker thread so the
host's event loop stays responsive while a step runs.

The runner thread and the event loop share one GIL. When the engine submits step N+1 and then
detokenizes step N, that host work would hold the GIL while the runner thread needs it to launch
N+1, and the device would wait for Python. So on a device that runs asynchronously (CUDA),
`submit` blocks until the runner has queued the step's device work (a fraction of a millisecond
for a graph replay, a few for a piecewise mixed step); the engine's host work then runs while the
device does. Measured with a simulated 5 ms device step, 64 streams: `benchmarks/engine_overhead.py`.

A step submitted while another one runs (asynchronous scheduling) is launched at once, behind it
on the device: the runner thread launches, and a collector thread (`StepCollector`) waits for each
step's sampled ids in turn, so the device starts step N+1 as soon as it ends step N.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from fastgen.config import EngineConfig
from fastgen.executor.collector import Deliver, StepCollector, launch_step
from fastgen.models.config import ModelConfig
from fastgen.plan import StepPlan, StepResult


class InProcessExecutor:
    """Runs steps on a `ModelRunner` in a dedicated thread of this process."""

    LAUNCH_WAIT_S = 0.05  # longest the event loop blocks for a launch (first steps may compile)

    def __init__(
        self, runner, pool: concurrent.futures.ThreadPoolExecutor, wait_for_launch: bool | None = None
    ):
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks
        self._pool = pool
        self._closed = False
        if wait_for_launch is None:
            wait_for_launch = getattr(runner, "device", None) is not None and runner.device.type == "cuda"
        self.wait_for_launch = wait_for_launch
        self._outstanding = 0  # steps submitted and not finished
        self._collector = StepCollector("fastgen-collector")

    @classmethod
    async def create(
        cls, model_path: str, config: EngineConfig, model_config: ModelConfig, max_model_len: int
    ) -> InProcessExecutor:
        from fastgen.runner import ModelRunner

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastgen-runner")
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(
                pool, lambda: ModelRunner(model_path, config, model_config, max_model_len)
            )
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return cls(runner, pool)

    @property
    def is_alive(self) -> bool:
        return not self._closed

    def submit(self, plan: StepPlan) -> asyncio.Future[StepResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StepResult] = loop.create_future()
        wait = self.wait_for_launch and self._outstanding == 0
        self._outstanding += 1
        future.add_done_callback(self._finished)

        def deliver(result: StepResult | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, result, error)

        launched = threading.Event() if wait else None
        self._pool.submit(self._launch, plan, deliver, launched)
        if launched is not None:
            launched.wait(self.LAUNCH_WAIT_S)
        return future

    def _finished(self, _: asyncio.Future) -> None:
        self._outstanding -= 1

    def _launch(self, plan: StepPlan, deliver: Deliver, launched: threading.Event | None) -> None:
        try:
            finish = launch_step(self.runner, plan, None if launched is None else launched.set)
        finally:
            if launched is not None:
                launched.set()
        self._collector.put(finish, deliver)

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self.submit(plan)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)  # the launches queued, then
        self._collector.close()  # their results
        self.runner = None


def _settle(future: asyncio.Future, result: StepResult | None, error: BaseException | None) -> None:
    if future.done():  # cancelled: the engine stopped reading
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
