"""`StepCollector`: steps' results awaited on a thread of their own, in the order the steps were
launched, so that the thread that launches steps can queue the next one while the device still
runs this one (the device goes from step to step without waiting for the host)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from fastgen.plan import StepPlan, StepResult

logger = logging.getLogger(__name__)

Finish = Callable[[], StepResult]  # waits for a launched step's result (or raises its failure)
Deliver = Callable[[StepResult | None, BaseException | None], None]


class StepCollector:
    """Runs each `put` step's ``finish`` in order on one thread and hands its result (or the
    exception it raised) to that step's ``deliver``."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue[tuple[Finish, Deliver] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, finish: Finish, deliver: Deliver) -> None:
        self._queue.put((finish, deliver))

    def close(self) -> None:
        """Deliver what was put, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            finish, deliver = item
            try:
                result, error = finish(), None
            except BaseException as exc:  # the step's failure, for its caller
                result, error = None, exc
            try:
                deliver(result, error)
            except Exception:  # a caller gone (its loop closed): the other steps still go out
                logger.exception("a step's result could not be delivered")


def launch_step(runner: Any, plan: StepPlan, on_launched: Callable[[], None] | None = None) -> Finish:
    """Launch ``plan`` on ``runner`` and return what waits for its result: the runner's
    ``collect`` where it can launch a step apart from collecting it (`ModelRunner`), else its
    ``execute``, run here (runners without a device of their own). A failure to launch is raised
    by the returned callable, so that it arrives in order."""
    try:
        if hasattr(runner, "launch"):
            launched = runner.launch(plan, on_launched)
            return lambda: runner.collect(launched)
        if on_launched is None:
            result = runner.execute(plan)
        else:
            result = runner.execute(plan, on_launched=on_launched)
        return lambda: result
    except Exception as exc:
        failure = exc

        def fail() -> StepResult:
            raise failure

        return fail
