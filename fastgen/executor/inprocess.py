"""`InProcessExecutor`: the model runner in the engine's process, on a worker thread so the
host's event loop stays responsive while a step runs."""

from __future__ import annotations

import asyncio
import concurrent.futures

from fastgen.config import EngineConfig
from fastgen.models.config import ModelConfig
from fastgen.plan import StepPlan, StepResult


class InProcessExecutor:
    """Runs steps on a `ModelRunner` in a dedicated thread of this process."""

    def __init__(self, runner, pool: concurrent.futures.ThreadPoolExecutor):
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks
        self._pool = pool
        self._closed = False

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
        return asyncio.get_running_loop().run_in_executor(self._pool, self.runner.execute, plan)

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self.submit(plan)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self.runner = None
