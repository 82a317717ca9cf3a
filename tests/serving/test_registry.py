"""Deployment discovery and `StreamGroup` (no processes)."""

from __future__ import annotations

import asyncio
import os

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
