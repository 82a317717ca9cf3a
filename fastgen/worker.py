"""A tensor-parallel worker process: ``python -m fastgen.worker SPEC_FILE RANK``.

The engine's `ZmqExecutor` starts one per rank. A worker joins the ``torch.distributed`` group
(NCCL on GPU, gloo on CPU), builds its `ModelRunner` shard, agrees on the KV-cache size with the
other ranks, reports ready, then runs every plan it receives and answers it. A step that raises
is answered with the error and the worker keeps serving. Plans are launched as they come and
answered as their results come in (`StepCollector`), so a step queues behind the one running.
It exits on the empty frame, or by itself when the engine process goes away.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import traceback
from typing import Any, Protocol

import zmq

from fastgen.executor.collector import Deliver, StepCollector, launch_step
from fastgen.executor.wire import (
    SHUTDOWN,
    PlanCodec,
    ReplyCodec,
    StepDone,
    StepFailed,
    WorkerReady,
    WorkerSpec,
    WorkerStartFailed,
)
from fastgen.heap import freeze_process_heap
from fastgen.plan import PENDING_TOKEN, StepPlan, StepResult
from fastgen.supervisor import watch_parent

logger = logging.getLogger("fastgen.worker")

_REPLY_LINGER_MS = 2000


class Runner(Protocol):
    num_kv_blocks: int

    def execute(self, plan: StepPlan) -> StepResult: ...


# -- runners --------------------------------------------------------------------------------


def build_model_runner(spec: WorkerSpec, rank: int) -> Runner:
    """The real runner: join the process group, load this rank's shard, agree on KV blocks."""
    from fastgen.layers.parallel import TensorParallel, init_distributed
    from fastgen.models.config import ModelConfig
    from fastgen.runner import ModelRunner, resolve_device

    config = spec.config
    size = config.tensor_parallel
    device = resolve_device(config, rank)
    tp = TensorParallel(rank, size)
    if size > 1:
        init_distributed(tp, device, timeout_s=max(config.worker_start_timeout_s, 60.0))
    runner = ModelRunner(
        spec.model_path,
        config,
        ModelConfig.from_dict(spec.model_config),
        spec.max_model_len,
        tp=tp,
    )
    return runner


class EchoRunner:
    """A runner without a model, for measuring the transport and testing supervision: it tracks
    live sequences like a real runner and samples each sampling chunk's last token again."""

    def __init__(self, spec: WorkerSpec, rank: int):
        self.num_kv_blocks = spec.config.num_kv_blocks or 4096
        self.last: dict[int, int] = {}  # live sequences -> their last token

    def execute(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.released:
            self.last.pop(seq_id, None)
        self.last.update((start.seq_id, 0) for start in plan.started)
        sampled = []
        for chunk in plan.chunks:
            if chunk.seq_id not in self.last:
                raise KeyError(f"sequence {chunk.seq_id} was never started")
            token = chunk.token_ids[-1]
            if token == PENDING_TOKEN:
                token = self.last[chunk.seq_id]
            self.last[chunk.seq_id] = token
            if chunk.sample:
                sampled.append(token)
        return StepResult(plan.step_id, sampled)


def load_factory(path: str) -> Any:
    """The callable named ``"module:attribute"``."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"runner factory {path!r} is not of the form 'module:callable'")
    return getattr(importlib.import_module(module), name)


# -- the process ----------------------------------------------------------------------------


def serve(runner: Runner, plans: zmq.Socket, replies: zmq.Socket, rank: int) -> None:
    """Answer plans until the shutdown frame: this thread launches each step as its plan comes,
    a collector thread sends each step's reply once its result is in (see `StepCollector`)."""
    plan_codec, reply_codec = PlanCodec(), ReplyCodec()
    collector = StepCollector(f"fastgen-worker-{rank}-collector")

    def replier(step_id: int) -> Deliver:
        def deliver(result: StepResult | None, error: BaseException | None) -> None:
            if error is not None:  # answered, and logged by the engine; the worker keeps serving
                trace = "".join(traceback.format_exception(error))
                reply: Any = StepFailed(rank, step_id, f"{error!r}\n{trace}")
            else:
                reply = StepDone(rank, step_id, result if rank == 0 else None)
            replies.send(reply_codec.encode(reply))

        return deliver

    try:
        while True:
            frame = plans.recv()
            if frame == SHUTDOWN:
                return
            plan = plan_codec.decode(frame)
            collector.put(launch_step(runner, plan), replier(plan.step_id))
    finally:
        collector.close()  # every launched step answered before the sockets close


def run_worker(spec: WorkerSpec, rank: int) -> int:
    """Start, serve and stop one rank; returns the process exit code."""
    watch_parent(spec.parent_pid)
    context = zmq.Context()
    plans = context.socket(zmq.PULL)
    plans.connect(spec.plan_address(rank))
    replies = context.socket(zmq.PUSH)
    replies.setsockopt(zmq.LINGER, _REPLY_LINGER_MS)
    replies.connect(spec.reply_address)
    codec = ReplyCodec()
    try:
        try:
            runner = load_factory(spec.runner_factory)(spec, rank)
        except BaseException:
            logger.exception("rank %d failed to start", rank)
            replies.send(codec.encode(WorkerStartFailed(rank, traceback.format_exc())))
            return 1
        if spec.config.freeze_gc:
            freeze_process_heap()
        replies.send(codec.encode(WorkerReady(rank, os.getpid(), runner.num_kv_blocks)))
        serve(runner, plans, replies, rank)
        close = getattr(runner, "close", None)
        if close is not None:
            close()
        _leave_distributed()
        return 0
    finally:
        plans.close(linger=0)
        replies.close()
        context.term()


def _leave_distributed() -> None:
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fastgen.worker SPEC_FILE RANK", file=sys.stderr)
        return 2
    spec = WorkerSpec.read(args[0])
    rank = int(args[1])
    # Ctrl-C in a terminal reaches the whole process group; the engine decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    )
    return run_worker(spec, rank)


if __name__ == "__main__":
    sys.exit(main())
