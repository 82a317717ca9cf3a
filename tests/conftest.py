import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when fastgen.kernels is first
# imported: set it before any test module imports fastgen, so that CPU runs interpret the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgen.toy import make_toy_checkpoint

_CHECKPOINTS: dict[tuple, str] = {}


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory):
    """Factory: ``toy_checkpoint(family, **overrides)`` -> path of a tiny random checkpoint,
    built once per session for each distinct set of arguments."""

    def build(family: str = "llama", **overrides) -> str:
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in _CHECKPOINTS:
            path = tmp_path_factory.mktemp(f"toy-{family}")
            _CHECKPOINTS[key] = str(make_toy_checkpoint(path, family, **overrides))
        return _CHECKPOINTS[key]

    return build


@pytest.fixture(scope="session")
def llama_path(toy_checkpoint) -> str:
    """Tiny Llama, multi-head attention."""
    return toy_checkpoint("llama")


@pytest.fixture
def fusions_off(monkeypatch):
    """``fusions_off(names)`` sets ``FASTGEN_FUSIONS_OFF`` for what runs next ("" for none: every
    fused kernel on); the setting is read once a process, so its cache is cleared around it."""
    from fastgen.kernels import _dispatch

    def switch(names: str) -> None:
        monkeypatch.setenv("FASTGEN_FUSIONS_OFF", names)
        _dispatch._fusions_off.cache_clear()

    yield switch
    monkeypatch.undo()
    _dispatch._fusions_off.cache_clear()
