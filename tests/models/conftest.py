"""GGUF tokenizers built by these tests are cached in a temporary directory, not the user's cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def gguf_tokenizer_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("fastgen-cache")
    previous = os.environ.get("FASTGEN_CACHE_DIR")
    os.environ["FASTGEN_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FASTGEN_CACHE_DIR", None)
    else:
        os.environ["FASTGEN_CACHE_DIR"] = previous
