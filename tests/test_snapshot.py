"""Engine snapshots (``fastgen snapshot``): a snapshot holds each rank's weights exactly as the
engine builds them from the source, for every family and source format; an engine started from
one answers as an engine started from the source (greedy, TP 1 and 2, float32, bf16 and FP8);
a snapshot made for other options, by another version, or damaged is refused, saying why."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.cli import main as cli_main
from fastgen.errors import ModelLoadError, UnsupportedModelError
from fastgen.layers.parallel import TensorParallel
from fastgen.models.checkpoint import load_tokenizer, resolve_model
from fastgen.models.config import ModelConfig
from fastgen.models.file_reader import drop_from_page_cache
from fastgen.models.loader import build_model, build_skeleton
from fastgen.models.safetensors_io import DamagedFileError, file_digest, write_tensors
from fastgen.models.snapshot import MANIFEST_NAME, SnapshotMismatchError, read_manifest, snapshot
from tests.helpers import collect
from tests.models.gguf_files import write_gguf

NEW_TOKENS = 10


def snapshot_of(source: str, out: Path, **options) -> str:
    return str(snapshot(source, out, show_progress=False, **options))


def built(path: str, rank: int = 0, size: int = 1, dtype=torch.float32, quantization=None) -> torch.nn.Module:
    return build_model(
        path, ModelConfig.from_pretrained(path), dtype=dtype, device=torch.device("cpu"),
        tp=TensorParallel(rank, size), max_model_len=64, show_progress=False, quantization=quantization,
    )  # fmt: skip


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and FP8 scale, as bytes (FP8 has no equality of its own)."""
    tensors = {**dict(model.named_parameters()), **scales(model)}
    return {name: tensor.detach().reshape(-1).view(torch.uint8) for name, tensor in tensors.items()}


def scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight_scale": module.weight_scale
        for name, module in model.named_modules()
        if getattr(module, "weight_scale", None) is not None
    }


def assert_same_weights(source: torch.nn.Module, loaded: torch.nn.Module) -> None:
    expected, actual = weights(source), weights(loaded)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    for (name, a), (_, b) in zip(source.named_parameters(), loaded.named_parameters()):
        assert a.dtype == b.dtype and a.shape == b.shape, name


# -- the weights -----------------------------------------------------------------------------------

FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3"]
FAMILIES += ["phi", "falcon", "opt", "qwen"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_the_weights_it_was_built_with(toy_checkpoint, tmp_path, family):
    source = toy_checkpoint(family)
    path = snapshot_of(source, tmp_path / "snap")
    expected, loaded = built(source), built(path)
    assert_same_weights(expected, loaded)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # the parameters are views of the one buffer the file was read into: nothing copied or converted
    assert len({p.untyped_storage().data_ptr() for p in loaded.parameters()}) == 1
    if expected.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("dtype", "quantization"), [(torch.float32, None), (torch.bfloat16, "fp8")], ids=["float32", "fp8-bf16"]
)
def test_each_rank_file_holds_that_ranks_shard(toy_checkpoint, tmp_path, dtype, quantization):
    """Each rank's file holds what that rank builds: its shard, quantized by itself with FP8 (the
    row-parallel layers' scales cover only its slice of the input features: they differ)."""
    source = toy_checkpoint("llama", num_key_value_heads=2)
    dtype_name = str(dtype).removeprefix("torch.")
    path = snapshot_of(
        source, tmp_path / "snap", tensor_parallel=2, quantization=quantization, dtype=dtype_name
    )
    manifest = read_manifest(path)
    assert manifest.options == {"tensor_parallel": 2, "dtype": dtype_name, "quantization": quantization}
    assert [rank.name for rank in manifest.ranks] == ["rank-0-of-2.safetensors", "rank-1-of-2.safetensors"]
    ranks = []
    for rank in range(2):
        loaded = built(path, rank, 2, dtype, quantization)
        assert_same_weights(built(source, rank, 2, dtype, quantization), loaded)
        ranks.append(loaded)
    layers = [model.model.layers[0] for model in ranks]
    assert not torch.equal(layers[0].mlp.down_proj.weight, layers[1].mlp.down_proj.weight)  # shards
    if quantization:
        assert len(scales(ranks[0])) == 4 * ranks[0].config.num_layers  # qkv, o, gate-up, down
        assert layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
        assert ranks[0].lm_head.weight.dtype == torch.bfloat16  # the LM head keeps the model dtype
        assert not torch.equal(layers[0].mlp.down_proj.weight_scale, layers[1].mlp.down_proj.weight_scale)


def test_modules_are_built_without_parameter_memory(toy_checkpoint):
    config = ModelConfig.from_pretrained(toy_checkpoint("llama"))
    skeleton = build_skeleton(
        config, dtype=torch.float32, device=torch.device("cpu"), tp=TensorParallel(), max_model_len=64
    )
    assert all(param.is_meta for param in skeleton.parameters())
    rotary = skeleton.model.layers[0].self_attn.rotary
    assert (
        not rotary.cos_sin_cache.is_meta and rotary.cos_sin_cache.abs().sum() > 0
    )  # computed, on the device


def test_building_the_modules_imports_no_symbolic_shapes(toy_checkpoint):
    """The skeleton's placeholders are plain ``empty`` on the meta device: a ``_like`` op there runs
    torch's Python meta kernels, whose first use imports torch's symbolic-shapes machinery (seconds
    of a GPU engine's start, in a fresh process)."""
    code = (
        "import sys, torch\n"
        "from fastgen.layers.parallel import TensorParallel\n"
        "from fastgen.models.config import ModelConfig\n"
        "from fastgen.models.loader import build_skeleton\n"
        f"config = ModelConfig.from_pretrained({toy_checkpoint('llama')!r})\n"
        "build_skeleton(config, dtype=torch.float32, device=torch.device('cpu'), tp=TensorParallel(),"
        " max_model_len=64)\n"
        "print('torch.fx.experimental.symbolic_shapes' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


# -- engines ---------------------------------------------------------------------------------------


def greedy(path: str, prompts: list[str], **options) -> list[tuple[list[int], str]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    async def main():
        config = EngineConfig(**{"dtype": "float32", "num_kv_blocks": 64, **options})
        async with await AsyncEngine.start(path, config) as engine:
            results = await asyncio.gather(*(collect(engine, prompt, params) for prompt in prompts))
        return [(ids, text) for ids, text, _ in results]

    return asyncio.run(asyncio.wait_for(main(), 120))


PROMPTS = ["the engine schedules decodes first", "prompt chunks fill the budget", "a"]


@pytest.mark.parametrize(
    "options",
    [{}, {"dtype": "bfloat16"}, {"quantization": "fp8"}, {"quantization": "fp8", "dtype": "bfloat16"}],
    ids=["float32", "bf16", "fp8", "fp8-bf16"],
)
def test_engine_answers_as_from_the_source(toy_checkpoint, tmp_path, options):
    source = toy_checkpoint("llama", train_steps=200, seed=3)
    path = snapshot_of(source, tmp_path / "snap", **options)
    expected = greedy(source, PROMPTS, **options)
    assert greedy(path, PROMPTS, **options) == expected
    assert len({text for _, text in expected}) == len(PROMPTS)  # real, distinct answers


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"quantization": "fp8"}], ids=["bf16", "fp8"])
def test_gpu_engine_answers_as_from_the_source(toy_checkpoint, tmp_path, options):
    """The snapshot read on a GPU (pinned staging buffers, a copy stream) serves as the source."""
    options = {**options, "dtype": "bfloat16", "device": "cuda"}
    source = toy_checkpoint("llama", train_steps=200, seed=3)
    path = snapshot_of(source, tmp_path / "snap", **options)
    assert greedy(path, PROMPTS, **options) == greedy(source, PROMPTS, **options)


def test_tensor_parallel_engine_answers_as_from_the_source(toy_checkpoint, tmp_path):
    """Two worker processes (gloo), each reading its own rank's file; bf16 with FP8 weights (the
    float32 ranks hold the source's weights bit for bit: test_each_rank_file_holds_that_ranks_shard)."""
    source = toy_checkpoint("llama", train_steps=200, seed=3)
    options = {"tensor_parallel": 2, "quantization": "fp8", "dtype": "bfloat16"}
    path = snapshot_of(source, tmp_path / "snap", **options)
    assert greedy(path, PROMPTS, **options) == greedy(source, PROMPTS, **options)


@pytest.mark.parametrize("source_format", ["bin", "gguf"])
def test_bin_and_gguf_sources_snapshot_too(toy_checkpoint, tmp_path, source_format):
    if source_format == "bin":
        source = toy_checkpoint("llama", weights_format="bin")
        assert not list(Path(source).glob("*.safetensors"))
    else:  # a Q8_0 file: dequantized once, when the snapshot is made
        folder = tmp_path / "gguf"
        folder.mkdir()
        source = str(write_gguf(toy_checkpoint("llama"), folder / "toy.gguf", "Q8_0"))
    path = snapshot_of(source, tmp_path / "snap")
    assert_same_weights(built(source), built(path))
    assert greedy(path, PROMPTS[:2]) == greedy(source, PROMPTS[:2])
    tokenizer, copied = load_tokenizer(source), load_tokenizer(path)  # a GGUF's: built and saved
    text = "Decodes first, then chunks of prompts!"
    assert copied.encode(text) == tokenizer.encode(text)
    assert copied.chat_template == tokenizer.chat_template


# -- refusals --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_snapshot(toy_checkpoint, tmp_path_factory) -> str:
    return snapshot_of(
        toy_checkpoint("llama"), tmp_path_factory.mktemp("refusals") / "snap", tensor_parallel=2
    )


def a_copy(path: str, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    return copy


def start(path: str | Path, **options) -> None:
    async def main():
        engine = await AsyncEngine.start(
            str(path), EngineConfig(**{"dtype": "float32", "num_kv_blocks": 16, **options})
        )
        await engine.stop()

    asyncio.run(main())


def test_other_options_are_refused_naming_each_difference(llama_snapshot):
    with pytest.raises(SnapshotMismatchError) as error:
        start(llama_snapshot, executor="inprocess", quantization="fp8", dtype="bfloat16")
    message = str(error.value)
    for difference in (
        "tensor_parallel=2",
        "tensor_parallel=1",
        "dtype=float32",
        "dtype=bfloat16",
        "quantization=fp8",
    ):
        assert difference in message, difference
    assert "fastgen snapshot" in message  # how to make one for these options
    with pytest.raises(SnapshotMismatchError, match="quantization=None; this engine runs quantization=fp8"):
        built(llama_snapshot, 0, 2, quantization="fp8")


def test_another_version_is_refused_before_loading(llama_snapshot, tmp_path):
    copy = a_copy(llama_snapshot, tmp_path)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["fastgen_version"] = "0.0.1"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotMismatchError, match=r"made by fastgen 0\.0\.1 .* this is fastgen"):
        resolve_model(copy)


def test_a_damaged_weights_file_is_found_by_its_hash_before_serving(llama_snapshot, tmp_path):
    copy = a_copy(llama_snapshot, tmp_path)
    file = copy / "rank-1-of-2.safetensors"
    data = bytearray(file.read_bytes())
    data[-100] ^= 0x40  # one bit of the last tensor's data: the file still parses
    file.write_bytes(bytes(data))
    resolve_model(copy)  # sizes and small files are fine: only reading the weights can tell
    with pytest.raises(
        DamagedFileError, match=r"rank-1-of-2\.safetensors: bytes 0\.\.\d+ do not match the hash"
    ):
        built(str(copy), 1, 2)
    built(str(copy), 0, 2)  # the other rank's file is intact


def test_an_engine_refuses_a_damaged_snapshot_before_serving(toy_checkpoint, tmp_path):
    """The weights read cold (O_DIRECT where the file system allows) and hashed on other threads:
    a flipped bit stops the engine's start, naming the file and the bytes."""
    path = Path(snapshot_of(toy_checkpoint("llama"), tmp_path / "snap"))
    file = path / "rank-0-of-1.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    drop_from_page_cache(file)  # the engine reads it cold, through O_DIRECT where allowed
    message = r"rank-0-of-1\.safetensors: bytes \d+\.\.\d+ do not match the hash"
    with pytest.raises(DamagedFileError, match=message):
        start(path)


def test_the_tokenizer_loads_while_the_weights_do(toy_checkpoint, monkeypatch):
    """The engine's start loads the tokenizer on a thread beside the weights' build (a build that
    waits for the tokenizer's load to begin would time out if they ran one after the other); a
    tokenizer that fails still stops the start, and the executor made meanwhile is shut down."""
    import threading

    import fastgen.engine as engine_module
    import fastgen.runner as runner_module
    from fastgen.executor import InProcessExecutor

    source = toy_checkpoint("llama")
    tokenizer_started = threading.Event()
    load_tokenizer, build = engine_module._load_tokenizer, runner_module.build_model

    def slow_tokenizer(path: str):
        tokenizer_started.set()
        return load_tokenizer(path)

    def build_after_the_tokenizer_began(*args, **kwargs):
        assert tokenizer_started.wait(30), "the tokenizer did not load beside the weights"
        return build(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_load_tokenizer", slow_tokenizer)
    monkeypatch.setattr(runner_module, "build_model", build_after_the_tokenizer_began)
    start(source)

    shut_down = []
    shutdown = InProcessExecutor.shutdown

    async def record_shutdown(self):
        shut_down.append(self)
        await shutdown(self)

    def failing_tokenizer(path: str):
        tokenizer_started.set()
        raise OSError(f"no tokenizer in {path}")

    monkeypatch.setattr(engine_module, "_load_tokenizer", failing_tokenizer)
    monkeypatch.setattr(InProcessExecutor, "shutdown", record_shutdown)
    with pytest.raises(OSError, match="no tokenizer in"):
        start(source)
    assert len(shut_down) == 1


def test_the_weights_are_read_while_the_modules_are_built(toy_checkpoint, tmp_path, monkeypatch):
    """A snapshot's file is read beside the modules' build (a build that waits for the read to begin
    would time out if they ran one after the other); a build that fails stops the load."""
    import threading

    import fastgen.models.loader as loader_module
    import fastgen.models.safetensors_io as io_module

    read_started = threading.Event()
    load_tensors, build_skeleton_ = io_module.load_tensors, loader_module.build_skeleton

    def reading(*args, **kwargs):
        read_started.set()
        return load_tensors(*args, **kwargs)

    def build_after_the_read_began(*args, **kwargs):
        assert read_started.wait(30), "the weights were not read beside the modules' build"
        return build_skeleton_(*args, **kwargs)

    source = toy_checkpoint("llama")
    path = snapshot_of(source, tmp_path / "snap")
    monkeypatch.setattr(io_module, "load_tensors", reading)
    monkeypatch.setattr(loader_module, "build_skeleton", build_after_the_read_began)
    assert_same_weights(built(source), built(path))

    def failing_build(*args, **kwargs):
        raise MemoryError("no room for the modules")

    monkeypatch.setattr(loader_module, "build_skeleton", failing_build)
    with pytest.raises(MemoryError, match="no room"):
        built(path)


def test_truncated_or_missing_files_are_refused_at_once(llama_snapshot, tmp_path):
    copy = a_copy(llama_snapshot, tmp_path)
    rank = copy / "rank-0-of-2.safetensors"
    rank.write_bytes(rank.read_bytes()[:-8])
    with pytest.raises(DamagedFileError, match="truncated"):
        start(copy, tensor_parallel=2)
    shutil.copy2(Path(llama_snapshot) / rank.name, rank)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"a"', '"b"', 1))
    with pytest.raises(DamagedFileError, match=r"tokenizer\.json does not match its hash"):
        resolve_model(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(DamagedFileError, match=r"tokenizer\.json is missing"):
        resolve_model(copy)


def test_weights_in_another_layout_are_refused_by_name(llama_snapshot, tmp_path):
    """A file whose hash is right but whose tensors are not what this fastgen builds (a layout
    change between versions) names the tensors that differ."""
    copy = a_copy(llama_snapshot, tmp_path)
    tensors = {name: tensor.clone() for name, tensor in built(str(copy), 0, 2).named_parameters()}
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = tensors["model.layers.0.self_attn.qkv_proj.weight"][
        :-1
    ]
    tensors["model.layers.0.mlp.extra.weight"] = tensors.pop("model.layers.1.mlp.down_proj.weight")
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["ranks"][0] = msgspec.to_builtins(write_tensors(tensors, copy / "rank-0-of-2.safetensors"))
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotMismatchError) as error:
        built(str(copy), 0, 2)
    message = str(error.value)
    assert "missing: model.layers.1.mlp.down_proj.weight" in message
    assert "unexpected: model.layers.0.mlp.extra.weight" in message
    assert "model.layers.0.self_attn.qkv_proj.weight" in message and "another shape" in message


def test_snapshot_needs_a_new_directory_and_a_model_source(toy_checkpoint, llama_snapshot, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        snapshot_of(toy_checkpoint("llama"), occupied)
    assert (occupied / "notes.txt").read_text() == "mine"
    with pytest.raises(ModelLoadError, match="is a snapshot already"):
        snapshot_of(llama_snapshot, tmp_path / "again")
    with pytest.raises(UnsupportedModelError, match="load_format='pt' cannot read it"):
        resolve_model(llama_snapshot, "pt")
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind


# -- the command -----------------------------------------------------------------------------------


def test_snapshot_command(toy_checkpoint, tmp_path, capsys):
    source = toy_checkpoint("llama")
    out = tmp_path / "snap"
    argv = [
        "snapshot",
        source,
        str(out),
        "--tensor-parallel",
        "2",
        "--quantization",
        "fp8",
        "--max-seqs",
        "4",
    ]
    assert cli_main(argv) == 0
    assert "tensor_parallel=2, dtype=float32, quantization=fp8" in capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest.source == str(Path(source).resolve())
    names = {digest.name for digest in manifest.files}
    assert {"config.json", "tokenizer.json"} <= names and not any(n.endswith(".safetensors") for n in names)
    assert all(file_digest(out / d.name).chunks == d.chunks for d in [*manifest.files, *manifest.ranks])
    assert cli_main(argv) == 1  # OUT exists now
    assert "not an empty directory" in capsys.readouterr().err


def test_hashes_name_the_damaged_piece(tmp_path):
    """Files are hashed in pieces: reading verifies each as it arrives and names the bytes."""
    from safetensors import safe_open

    from fastgen.models.safetensors_io import read_tensors

    tensors = {
        "big": torch.randn(3000),
        "bf16": torch.randn(7, 5).to(torch.bfloat16),
        "fp8": torch.randn(64, 16).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(11),
        "empty": torch.empty(0, 4),
    }
    file = tmp_path / "t.safetensors"
    digest = write_tensors(tensors, file, {"note": "hello"}, chunk_bytes=4096)
    assert digest.chunk_bytes == 4096 and len(digest.chunks) == -(-digest.size // 4096) > 3
    read = read_tensors(file, digest, torch.device("cpu"), workers=2)
    with safe_open(str(file), framework="pt") as handle:  # the safetensors package reads it too
        assert handle.metadata() == {"note": "hello"}
        for name, tensor in tensors.items():
            for other in (read[name], handle.get_tensor(name)):
                assert other.dtype == tensor.dtype and other.shape == tensor.shape
                assert torch.equal(other.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    data = bytearray(file.read_bytes())
    data[4096 * 2 + 10] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"bytes 8192\.\.12288 do not match"):
        read_tensors(file, digest, torch.device("cpu"), workers=2)
    data[8] = ord("!")  # the header no longer parses
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="unreadable safetensors header"):
        read_tensors(file, digest, torch.device("cpu"), workers=1)
