"""`fastgen.supervisor`: children started, fed, watched, reaped and stopped; start-up waits; backoff.

The children are `tests/supervised_child.py` (a few lines of Python, no fastgen engine).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from fastgen.supervisor import (
    Backoff,
    Child,
    ChildExitedError,
    Launch,
    LocalPlacement,
    RestartPolicy,
    StartTimeoutError,
    spawn,
    wait_started,
    wait_started_blocking,
)
from tests.processes import descendants, is_running, zombies

ROOT = Path(__file__).resolve().parent.parent
CHILD = "tests.supervised_child"
SLACK_S = 30.0  # bounds on waits that must end by an event: generous for a busy CI machine


@pytest.fixture
def env():
    """The children import ``tests`` whatever the current directory."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run(coroutine, timeout_s: float = 60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


async def first_line(child: Child) -> None:
    """Wait until the child printed something (it is up)."""
    while not child._output:
        assert child.exit_code is None, child.describe_exit()
        await asyncio.sleep(0.01)


def test_payload_goes_to_stdin_and_output_is_kept_and_described(env):
    async def main():
        child = spawn("echoer", CHILD, ["echo"], payload=b"secret spec", env=env)
        code = await child.wait_exit()
        described = child.describe_exit()
        child.close()
        return child, code, described

    child, code, described = run(main())
    assert code == 0
    assert described == f"echoer (pid {child.pid}) exited with code 0; last output:\npayload: secret spec"
    assert b"secret" not in Path(f"/proc/{os.getpid()}/cmdline").read_bytes()  # never on a command line


def test_an_exit_is_an_event_and_the_child_is_reaped_at_once(env):
    """SIGKILL from outside: `wait_exit` returns with the signal, and by then the child is no
    zombie (nothing polled it: the exit event reaped it)."""

    async def main():
        child = spawn("sleeper", CHILD, ["sleep"], env=env)
        seen: list[int | None] = []
        child.on_exit(lambda c: seen.append(c.exit_code))
        await first_line(child)
        os.kill(child.pid, signal.SIGKILL)
        code = await asyncio.wait_for(child.wait_exit(), SLACK_S)
        await asyncio.sleep(0)  # the on_exit callback runs right after
        reaped = child.pid not in descendants()
        summary, described = child.exit_summary(), child.describe_exit()
        child.close()
        return code, seen, reaped, summary, described

    code, seen, reaped, summary, described = run(main())
    assert code == -signal.SIGKILL and seen == [-signal.SIGKILL]
    assert reaped and zombies() == []
    assert summary == "exited with code -9 (SIGKILL)"
    assert described.endswith("exited with code -9 (SIGKILL); last output:\nsleeping")


def test_stop_escalates_to_kill_for_a_child_that_ignores_terminate(env):
    async def main():
        child = spawn("stubborn", CHILD, ["stubborn"], env=env)
        await first_line(child)
        started = time.monotonic()
        code = await child.stop(grace_s=0.1, terminate_grace_s=0.3)
        return code, time.monotonic() - started, child

    code, took_s, child = run(main())
    assert code == -signal.SIGKILL  # SIGTERM was ignored; SIGKILL is not
    assert took_s >= 0.4 and not is_running(child.pid)


def test_wait_started_returns_when_nothing_is_pending_and_names_an_early_exit(env, tmp_path):
    async def main():
        sleeper = spawn("sleeper", CHILD, ["sleep"], env=env)
        ready: set[Child] = set()
        changed = asyncio.Event()

        def report_ready():
            ready.add(sleeper)
            changed.set()

        asyncio.get_running_loop().call_later(0.05, report_ready)
        await wait_started([sleeper], lambda: [c for c in [sleeper] if c not in ready], SLACK_S, changed)
        # another child, never ready, exits: the wait ends with its exit, not the deadline
        quitter = spawn("quitter", CHILD, ["exit", "7"], env=env, log_path=tmp_path / "quitter.log")
        started = time.monotonic()
        with pytest.raises(ChildExitedError) as failure:
            await wait_started([sleeper, quitter], lambda: [quitter], 600, asyncio.Event())
        waited = time.monotonic() - started
        await sleeper.stop(grace_s=0)
        return failure.value, waited, quitter

    error, waited, quitter = run(main())
    assert waited < SLACK_S  # the exit event ended the wait, long before 600 s
    assert error.child is quitter
    assert str(error) == (
        f"quitter (pid {quitter.pid}) exited with code 7; the end of {quitter.log_path}:\ngiving up with 7"
    )


def test_start_timeouts_name_the_children_still_pending(env):
    async def main():
        child = spawn("slow", CHILD, ["sleep"], env=env)
        try:
            await first_line(child)
            with pytest.raises(StartTimeoutError) as failure:
                await wait_started([child], lambda: [child], 0.2, asyncio.Event())
            with pytest.raises(StartTimeoutError):
                wait_started_blocking([child], lambda: [child], 0.2)
            return failure.value, child
        finally:
            await child.stop(grace_s=0)

    error, child = run(main())
    assert error.children == [child]
    assert str(error).startswith("slow not ready after 0.2 s\n")
    assert "sleeping" in str(error)  # its output


def test_wait_started_blocking_names_an_early_exit(env):
    child = spawn("quitter", CHILD, ["exit", "3"], env=env)
    with pytest.raises(ChildExitedError, match=r"quitter \(pid \d+\) exited with code 3"):
        wait_started_blocking([child], lambda: [child], 600)
    assert child.stop_blocking(grace_s=0) == 3
    child.close()


def test_local_placement_starts_a_logged_child(env, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the placement passes our environment on
    launch = Launch(name="replica 0", module=CHILD, payload=b"spec", log_path=str(tmp_path / "r0.log"))

    async def main():
        child = LocalPlacement().start(launch)
        return child, await child.wait_exit()

    child, code = run(main())
    assert code == 1  # no mode on its command line: an IndexError, in its log
    assert "IndexError" in (tmp_path / "r0.log").read_text()
    assert child.name == "replica 0"


def test_backoff_doubles_up_to_its_cap_and_gives_up_after_n_failures_in_the_window():
    backoff = Backoff(RestartPolicy(first_delay_s=0.5, max_delay_s=3.0, max_failures=5, window_s=100.0))
    assert [backoff.failed(now=t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff.failed(now=4) is None  # the 5th failure within 100 s: give up
    spaced = Backoff(RestartPolicy(first_delay_s=1.0, max_failures=3, window_s=10.0))
    # failures further apart than the window never add up
    assert [spaced.failed(now=t) for t in (0, 20, 40, 60)] == [1.0, 1.0, 1.0, 1.0]
    assert spaced.recent_failures == 1
