"""What crosses between the engine process and its worker processes (no torch here).

The engine pushes one frame per step to every rank: a msgspec-encoded `StepPlan` (an empty
frame asks the worker to exit). Every rank answers each plan with a `StepDone` or `StepFailed`
(rank 0's `StepDone` carries the `StepResult`); at start each rank sends `WorkerReady` or
`WorkerStartFailed`. A `WorkerSpec` file tells a worker what to build and where to connect.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from fastgen.config import EngineConfig
from fastgen.ipc import Codec
from fastgen.plan import StepPlan, StepResult

SHUTDOWN = b""  # the frame that asks a worker to exit


class WorkerSpec(msgspec.Struct, kw_only=True):
    """Everything a worker needs, written once to a JSON file all ranks read."""

    model_path: str
    config: EngineConfig
    model_config: dict  # the raw Hugging Face config.json fields
    max_model_len: int
    socket_dir: str  # ipc sockets live here (0700: only this user can connect)
    parent_pid: int  # workers exit when this process goes away
    runner_factory: str  # "module:callable" building the runner (see fastgen.worker)
    log_level: int = 30  # the engine's level for the "fastgen" loggers

    def plan_address(self, rank: int) -> str:
        return f"ipc://{self.socket_dir}/plan-{rank}"

    @property
    def reply_address(self) -> str:
        return f"ipc://{self.socket_dir}/replies"

    def write(self, path: Path) -> None:
        path.write_bytes(msgspec.json.encode(self))

    @classmethod
    def read(cls, path: str | Path) -> WorkerSpec:
        return msgspec.json.decode(Path(path).read_bytes(), type=cls)


class WorkerReady(msgspec.Struct, tag="ready", array_like=True):
    rank: int
    pid: int
    num_kv_blocks: int  # already agreed by every rank (the minimum)


class WorkerStartFailed(msgspec.Struct, tag="start_failed", array_like=True):
    rank: int
    error: str  # the formatted traceback


class StepDone(msgspec.Struct, tag="done", array_like=True):
    rank: int
    step_id: int
    result: StepResult | None  # rank 0 only


class StepFailed(msgspec.Struct, tag="failed", array_like=True):
    rank: int
    step_id: int
    error: str  # repr of the exception, then the traceback


Reply = WorkerReady | WorkerStartFailed | StepDone | StepFailed


class PlanCodec(Codec[StepPlan]):
    """The codec of plans (engine -> workers)."""

    def __init__(self) -> None:
        super().__init__(StepPlan)


class ReplyCodec(Codec[Reply]):
    """The codec of worker replies (workers -> engine)."""

    def __init__(self) -> None:
        super().__init__(Reply)
