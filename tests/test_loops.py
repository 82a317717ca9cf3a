"""BackgroundLoop: results and errors cross threads, nothing waits on a loop that cannot run, and
closing runs a last coroutine, cancels what is left and ends the thread.

Interpreter exit (the `atexit` close, a frozen thread) is tested with real scripts in
`tests/test_readme_examples.py`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from fastgen.loops import BackgroundLoop

WAIT_S = 30.0  # a ceiling on things that take milliseconds


@pytest.fixture
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop(name="fastgen-test-loop")
    yield background
    background.close()


async def wait_for_cancellation(cancelled: threading.Event) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        cancelled.set()
        raise


def test_run_returns_results_and_raises_errors(loop: BackgroundLoop) -> None:
    async def divide(a: int, b: int) -> float:
        return a / b

    assert loop.run(divide(6, 3)) == 2
    with pytest.raises(ZeroDivisionError):
        loop.run(divide(1, 0))


def test_a_timeout_cancels_the_coroutine(loop: BackgroundLoop) -> None:
    cancelled = threading.Event()
    with pytest.raises(TimeoutError):
        loop.run(wait_for_cancellation(cancelled), timeout=0.05)
    assert cancelled.wait(WAIT_S)
    assert loop.run(asyncio.sleep(0, result="still serving")) == "still serving"


def test_run_on_the_loops_own_thread_raises_instead_of_waiting_on_itself(loop: BackgroundLoop) -> None:
    async def nested() -> None:
        assert not loop.can_run
        loop.run(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="own thread"):
        loop.run(nested(), timeout=WAIT_S)  # the nested run must raise, not block the loop


def test_close_runs_the_last_coroutine_then_cancels_the_rest() -> None:
    loop = BackgroundLoop()
    cancelled = threading.Event()
    cancelled_before_last: list[bool] = []

    async def start_background_task() -> None:
        asyncio.get_running_loop().create_task(wait_for_cancellation(cancelled))

    async def last() -> None:
        await asyncio.sleep(0.01)
        cancelled_before_last.append(cancelled.is_set())

    loop.run(start_background_task())
    loop.close(last())
    assert cancelled_before_last == [False] and cancelled.is_set()
    assert loop.loop.is_closed() and not loop.can_run
    loop.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        loop.run(asyncio.sleep(0))


def test_a_failing_or_hanging_last_coroutine_still_closes_the_loop() -> None:
    async def fail() -> None:
        raise OSError("the engine could not stop")

    failing = BackgroundLoop()
    failing.close(fail())
    assert failing.loop.is_closed()

    cancelled = threading.Event()
    hanging = BackgroundLoop()
    hanging.close(wait_for_cancellation(cancelled), timeout_s=0.05)
    assert cancelled.is_set() and hanging.loop.is_closed()


def test_close_on_the_loops_own_thread_does_not_wait() -> None:
    loop = BackgroundLoop()
    stopped = threading.Event()

    async def set_stopped() -> None:
        stopped.set()

    async def close_from_inside() -> str:
        loop.close(set_stopped())
        return "returned before the loop stopped"

    assert loop.run(close_from_inside(), timeout=WAIT_S) == "returned before the loop stopped"
    assert stopped.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while not loop.loop.is_closed() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.loop.is_closed()
