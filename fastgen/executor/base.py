"""The `Executor` interface: how the engine runs a step plan on its model runner(s)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from fastgen.plan import StepPlan, StepResult


class Executor(Protocol):
    """Runs step plans; implemented in-process and over ZeroMQ worker processes."""

    num_kv_blocks: int  # agreed by every rank at start

    @property
    def is_alive(self) -> bool:
        """False once a worker died; the engine then fails its requests and stops."""
        ...

    def submit(self, plan: StepPlan) -> asyncio.Future[StepResult]:
        """Start running ``plan`` now, before returning (the engine overlaps host work with it);
        the future resolves to the step's result, or raises if the step failed."""
        ...

    async def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and wait for it (``await submit(plan)``)."""
        ...

    async def shutdown(self) -> None:
        """Release devices and stop workers; idempotent."""
        ...
