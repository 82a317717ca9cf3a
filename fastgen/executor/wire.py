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
from fastgen.plan import StepPlan, StepResult

SHUTDOWN = b""  # the frame that asks a worker to exit


class WorkerSpec(msgspec.Struct, kw_only=True):
    """Everything a worker needs, written once to a JSON file all ranks read."""

    model_path: str
    config: EngineConfig
    model_config: dict  # the raw Hugging Face config.json fields
    max_model_len: int
    socket_dir: str  # ipc sockets live here
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


class PlanCodec:
    """Reused msgpack encoder/decoder for plans (building them per message costs more than the
    encoding of a small plan)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StepPlan)

    def encode(self, plan: StepPlan) -> bytes:
        return self._encoder.encode(plan)

    def decode(self, frame: bytes | memoryview) -> StepPlan:
        return self._decoder.decode(frame)


class ReplyCodec:
    """Reused msgpack encoder/decoder for worker replies."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Reply)

    def encode(self, reply: Reply) -> bytes:
        return self._encoder.encode(reply)

    def decode(self, frame: bytes | memoryview) -> Reply:
        return self._decoder.decode(frame)
