"""The README's examples as real scripts: each exits 0 within a bound and leaves no process behind.

Every script runs with a marker of its own in its environment, which the processes it starts inherit
(tensor-parallel workers, a deployment's server and replicas). After a script exits, /proc must hold no
process with its marker, except a persistent deployment's, which must outlive the script that started
it and be gone once the script that stops it has exited. A script that outlives its bound gets SIGABRT
first, so that `faulthandler` prints where each of its threads hangs.

The bounds are ceilings on hangs, not on speed: a start-up timeout (passed to the engine or the
deployment) plus ``STOP_BOUND_S`` for generating a few tokens and shutting down. One test runs in
this process: ``fastgen.pipeline()``'s model is optional.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import fastgen
from fastgen import AsyncEngine, EngineConfig
from fastgen.ipc import free_port
from fastgen.supervisor import kill

MARKER_VARIABLE = "FASTGEN_README_EXAMPLE_MARKER"
START_TIMEOUT_S = 120.0  # worker_start_timeout_s / start_timeout_s given to the examples
STOP_BOUND_S = 60.0  # a few tokens, then the engine's bounded shutdown (executor kill + loop close)
SCRIPT_TIMEOUT_S = START_TIMEOUT_S + STOP_BOUND_S
LEFTOVER_GRACE_S = 10.0  # for the kernel to reap what the script killed just before exiting

# Prepended to every script: the pids of the script's children, and the time of its last print.
PREAMBLE = '''
import os
import sys
import time

MODEL = sys.argv[1]


def children() -> list[int]:
    """The pids of this process's children."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid():
            found.append(int(entry))
    return found
'''

EPILOGUE = """
print("CHILDREN", *children())
print("LAST_PRINT", time.time(), flush=True)
"""


@dataclass
class ScriptRun:
    name: str
    stdout: str
    started: float  # time.time() of the start, and of the exit as seen from here
    exited: float

    def values(self, key: str) -> list[str]:
        """The words after ``key`` on the script's line that starts with it."""
        for line in self.stdout.splitlines():
            if line.startswith(key + " ") or line == key:
                return line.split()[1:]
        raise AssertionError(f"{self.name}: no {key!r} line in its output:\n{self.stdout}")

    @property
    def children(self) -> list[int]:
        return [int(pid) for pid in self.values("CHILDREN")]

    def timing(self) -> str:
        last_print = float(self.values("LAST_PRINT")[0])
        return (
            f"{self.name}: exited {self.exited - self.started:.1f} s after its start, "
            f"{self.exited - last_print:.2f} s after its last print"
        )


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds ``marker`` (a zombie's
    environment reads empty, so the dead are never listed)."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def assert_none_left(marker: str, who: str) -> None:
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"{who} left processes behind: {left}"


class Scripts:
    """Writes and runs example scripts; kills whatever they leave when the test ends."""

    def __init__(self, directory: Path, model: str):
        self.directory = directory
        self.model = model
        self.runtime_dir = directory / "runtime"  # the deployments' registry
        self.markers: list[str] = []

    def run(self, name: str, body: str, timeout_s: float = SCRIPT_TIMEOUT_S) -> tuple[ScriptRun, str]:
        """Run ``body`` as a script (``MODEL`` is the toy checkpoint); returns the run and its marker.
        Fails unless it exits with code 0 within ``timeout_s``."""
        marker = uuid.uuid4().hex
        self.markers.append(marker)
        path = self.directory / f"{name}.py"
        path.write_text(PREAMBLE + textwrap.dedent(body) + EPILOGUE)
        env = {**os.environ, MARKER_VARIABLE: marker, "FASTGEN_RUNTIME_DIR": str(self.runtime_dir)}
        started = time.time()
        process = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", str(path), self.model],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            stdout, stderr = process.communicate()
            pytest.fail(f"{name} was still running after {timeout_s:g} s; its stacks:\n{stderr[-6000:]}")
        run = ScriptRun(name, stdout, started, time.time())
        assert process.returncode == 0, f"{name} exited with code {process.returncode}:\n{stderr[-6000:]}"
        print(run.timing())
        return run, marker

    def kill_leftovers(self) -> None:
        for marker in self.markers:
            for pid in marked_processes(marker):
                kill(pid)


@pytest.fixture
def scripts(tmp_path: Path, llama_path: str) -> Iterator[Scripts]:
    runner = Scripts(tmp_path, llama_path)
    yield runner
    runner.kill_leftovers()


def test_pipeline_model_is_optional_and_a_failed_start_ends_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    models: list[str | None] = []

    async def start(model: str | None, config: EngineConfig) -> AsyncEngine:
        models.append(model)
        raise LookupError("no model here")

    monkeypatch.setattr(AsyncEngine, "start", start)
    for model in [(), (None,), (Path("some/model"),)]:
        with pytest.raises(LookupError, match="no model here"):
            fastgen.pipeline(*model, token_budget=64)
    assert models == [None, None, "some/model"]  # None: AsyncEngine.start loads its default model
    assert not [thread for thread in threading.enumerate() if thread.name == "fastgen-pipeline"]


def test_pipeline_with_destroy(scripts: Scripts) -> None:
    run, marker = scripts.run(
        "pipeline_destroy",
        """
        import fastgen
        from fastgen import EngineDeadError

        pipe = fastgen.pipeline(MODEL)
        responses = pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=8)
        print("TEXT", repr(responses[0].generated_text))
        pipe.destroy()
        pipe.destroy()  # idempotent
        try:
            pipe(["DeepSpeed is"], max_new_tokens=8)
        except EngineDeadError as error:
            print("AFTER_DESTROY", error)
        """,
    )
    assert run.values("TEXT")
    assert "destroyed" in " ".join(run.values("AFTER_DESTROY"))
    assert_none_left(marker, run.name)


def test_pipeline_without_destroy_exits(scripts: Scripts) -> None:
    run, marker = scripts.run(
        "pipeline_no_destroy",
        """
        import fastgen

        pipe = fastgen.pipeline(MODEL)
        print("TEXT", repr(pipe(["hello world"], max_new_tokens=4)[0].generated_text))
        """,
    )
    assert run.values("TEXT")
    assert_none_left(marker, run.name)


def test_temporary_pipelines_exit(scripts: Scripts) -> None:
    run, marker = scripts.run(
        "pipeline_temporary",
        """
        import fastgen

        print("TEXT", repr(fastgen.pipeline(MODEL)(["DeepSpeed is"], max_new_tokens=4)[0].generated_text))
        cyclic = fastgen.pipeline(MODEL)  # in a reference cycle: collected late, if ever
        cyclic.itself = cyclic
        print("CYCLIC", cyclic("Seattle is", max_new_tokens=4)[0].generated_length)
        del cyclic
        """,
    )
    assert run.values("TEXT")
    assert int(run.values("CYCLIC")[0]) >= 1
    assert_none_left(marker, run.name)


def test_tensor_parallel_pipeline_without_destroy_stops_its_workers(scripts: Scripts) -> None:
    run, marker = scripts.run(
        "pipeline_tensor_parallel",
        f"""
        import fastgen

        pipe = fastgen.pipeline(MODEL, tensor_parallel=2, worker_start_timeout_s={START_TIMEOUT_S})
        print("TEXT", repr(pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=4)[0].generated_text))
        """,
    )
    assert run.values("TEXT")
    assert len(run.children) >= 2, "the two worker processes were running before the script ended"
    assert_none_left(marker, run.name)


def test_serve_outlives_its_script_and_a_second_script_stops_it(scripts: Scripts) -> None:
    port = free_port()
    first, first_marker = scripts.run(
        "serve",
        f"""
        import fastgen

        client = fastgen.serve(MODEL, deployment_name="demo", replica_num=2, enable_restful_api=True,
                               restful_api_port={port}, start_timeout_s={START_TIMEOUT_S})
        print("TEXT", repr(client.generate(["DeepSpeed is"], max_new_tokens=8)[0].generated_text))
        stream = client.stream("Seattle is", max_new_tokens=64)  # left open at exit: must not hang
        print("STREAMED", repr(next(stream).generated_text))
        """,
    )
    assert first.values("TEXT") and first.values("STREAMED")
    deployment = marked_processes(first_marker)
    assert len(deployment) >= 3, f"the server and its 2 replicas outlive the script: {deployment}"

    second, second_marker = scripts.run(
        "client_and_terminate",
        f"""
        import json
        import urllib.request

        import fastgen

        other = fastgen.client("demo")
        print("TEXT", repr(other.generate(["Seattle is"], max_new_tokens=8)[0].generated_text))
        request = urllib.request.Request(
            "http://127.0.0.1:{port}/mii/demo",
            data=json.dumps({{"prompts": ["DeepSpeed is", "Seattle is"], "max_length": 16}}).encode(),
            headers={{"Content-Type": "application/json"}},
        )
        with urllib.request.urlopen(request, timeout={STOP_BOUND_S}) as reply:
            print("REST", reply.status, json.dumps(json.loads(reply.read())))
        other.terminate_server()
        """,
    )
    assert second.values("TEXT")
    status, *body = second.values("REST")
    responses = json.loads(" ".join(body))
    assert status == "200" and len(responses) == 2
    assert all(r["prompt_length"] + r["generated_length"] <= 16 for r in responses)
    assert_none_left(first_marker, "the deployment, after terminate_server()")
    assert_none_left(second_marker, second.name)
    assert not (scripts.runtime_dir / "demo" / "deployment.json").exists()
