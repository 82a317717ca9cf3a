"""Deployment discovery and `StreamGroup` (no processes)."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from fastgen.errors import DeploymentNotFoundError
from fastgen.serving import registry
from fastgen.streams import StreamGroup


def info(name: str, pid: int, model: str = "/models/llama") -> registry.DeploymentInfo:
    return registry.DeploymentInfo(
        name=name, model=model, address="tcp://127.0.0.1:1", server_pid=pid, replicas=[], max_model_len=8
    )


def test_lookup_by_name_or_model_and_stale_entries_are_dropped(runtime_dir):
    assert registry.runtime_dir() == runtime_dir
    registry.register(info("alive", os.getpid()))
    registry.register(info("stale", 2**22 + 12345, model="/models/other"))
    assert registry.lookup("alive").server_pid == os.getpid()
    assert registry.lookup("/models/llama").name == "alive"
    assert registry.lookup("llama").name == "alive"
    with pytest.raises(DeploymentNotFoundError, match="stale"):
        registry.lookup("stale")  # its server is gone
    assert registry.read("stale") is None
    registry.unregister("alive")
    with pytest.raises(DeploymentNotFoundError):
        registry.lookup("alive")


def test_names():
    assert registry.default_name("/x/My Model/") == "My-Model-deployment"
    for bad in ("", "../x", "a/b", "x" * 200):
        with pytest.raises(ValueError):
            registry.check_name(bad)


async def _items(values, fail_at=None, delay=0.0):
    for i, value in enumerate(values):
        await asyncio.sleep(delay)
        if i == fail_at:
            raise ValueError("broken")
        yield value


def test_stream_group_merges_and_fails_as_a_whole():
    async def main():
        group = StreamGroup([_items("ab"), _items("xyz")])
        await group.start()
        got = [item async for item in group]
        assert sorted(got) == [(0, "a"), (0, "b"), (1, "x"), (1, "y"), (1, "z")]

        closed = asyncio.Event()

        async def endless():
            try:
                while True:
                    yield 1
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        group = StreamGroup([endless(), _items("ab", fail_at=0)])
        with pytest.raises(ValueError):
            await group.start()  # refused before any output: the other stream is cancelled
        await asyncio.wait_for(closed.wait(), 1)

    asyncio.run(main())


def test_registry_files_hold_the_secret_for_this_user_alone(runtime_dir):
    os.chmod(runtime_dir, 0o755)  # a directory of ours left open is closed again
    path = registry.register(info("private", os.getpid()))
    try:
        assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        registry.register(info("private", os.getpid()))  # rewritten atomically, still 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        registry.unregister("private")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_runtime_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 65534, 65534)  # nobody's
    monkeypatch.setenv("FASTGEN_RUNTIME_DIR", str(foreign))
    with pytest.raises(PermissionError, match="not a directory of this user"):
        registry.runtime_dir()
