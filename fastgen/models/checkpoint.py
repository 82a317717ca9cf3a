"""What a model argument names: a Hugging Face directory, a GGUF file (or a directory holding one),
a fastgen snapshot (`fastgen.models.snapshot`), or nothing (the default model). `resolve_model`
checks it before anything loads, so that a bad path gets one error that says what was expected,
in whichever process it is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastgen.errors import ModelNotFoundError, UnsupportedModelError

from .default import default_model_path
from .gguf import gguf_file_in, is_gguf_file
from .snapshot import check_snapshot, is_snapshot

_EXPECTED = "a Hugging Face model directory (config.json, tokenizer and weights) or a .gguf file"


def resolve_model(model: str | Path | None, load_format: str = "auto") -> str:
    """The checkpoint ``model`` names, as a path string: the default model when None, the GGUF file
    of a directory holding one, else ``model`` itself once checked. Raises `ModelNotFoundError`
    (nothing there) or `UnsupportedModelError` (something fastgen does not read); a snapshot's
    manifest and small files are checked here (`check_snapshot`), its weights as they load."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{model}: no such file or directory; expected {_EXPECTED}")
    if is_snapshot(path):
        if load_format not in ("auto", "safetensors", "dummy"):
            raise UnsupportedModelError(
                f"{model} is a fastgen snapshot: load_format={load_format!r} cannot read it"
            )
        check_snapshot(path)
        return str(path)
    gguf_file = gguf_file_in(path)
    if gguf_file is not None:
        if not is_gguf_file(gguf_file):
            raise UnsupportedModelError(f"{gguf_file} is not a GGUF file (it lacks the GGUF magic bytes)")
        return str(gguf_file)
    if path.is_file():
        raise UnsupportedModelError(f"{model} is a file fastgen cannot load; expected {_EXPECTED}")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{model} holds no config.json and no .gguf file; expected {_EXPECTED}")
    if load_format != "dummy" and not _has_weights(path, load_format):
        raise ModelNotFoundError(
            f"{model} holds no weights (*.safetensors or *.bin) for load_format={load_format!r}; "
            "add them, or use load_format='dummy' (--load-format dummy) for random weights"
        )
    return str(path)


def _has_weights(path: Path, load_format: str) -> bool:
    safetensors = any(path.glob("*.safetensors"))
    pickled = any(p.name != "training_args.bin" for p in path.glob("*.bin"))
    return {"safetensors": safetensors, "pt": pickled}.get(load_format, safetensors or pickled)


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer of a model directory, a GGUF file (built from its metadata), or a hub name;
    a Qwen (v1) directory's tiktoken vocabulary is built without its remote code."""
    gguf_file = gguf_file_in(Path(path))
    if gguf_file is not None:
        from .gguf import load_tokenizer as load_gguf_tokenizer

        return load_gguf_tokenizer(gguf_file)
    if (Path(path) / "qwen.tiktoken").is_file() and not (Path(path) / "tokenizer.json").is_file():
        from .qwen import load_tokenizer as load_qwen_tokenizer

        return load_qwen_tokenizer(Path(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
