"""The `Executor` interface: how the engine runs a step plan on its model runner(s)."""

from __future__ import annotations

from typing import Protocol

from fastgen.plan import StepPlan, StepResult


class Executor(Protocol):
    """Runs step plans; implemented in-process and over ZeroMQ worker processes."""

    num_kv_blocks: int  # agreed by every rank at start

    @property
    def is_alive(self) -> bool:
        """False once a worker died; the engine then fails its requests and stops."""
        ...

    async def execute(self, plan: StepPlan) -> StepResult:
        """Run one step; raises if the step failed."""
        ...

    async def shutdown(self) -> None:
        """Release devices and stop workers; idempotent."""
        ...
