"""benchmarks/snapshot_load.py: the page-cache tools it measures with, and one small run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import snapshot_load  # noqa: E402


def test_eviction_empties_the_page_cache_of_a_file(tmp_path):
    file = tmp_path / "data.bin"
    file.write_bytes(os.urandom(4 << 20))
    snapshot_load.buffered_read_s([file])
    assert snapshot_load.resident_fraction([file]) == 1.0
    snapshot_load.evict([file])
    assert snapshot_load.resident_fraction([file]) < 0.1  # no root needed
    seconds = snapshot_load.direct_read_s([file])  # None where the file system refuses O_DIRECT (tmpfs)
    assert seconds is None or seconds > 0


def test_conversion_at_load_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert not snapshot_load.converts_at_load(str(tmp_path), "none", "bfloat16")
    assert snapshot_load.converts_at_load(str(tmp_path), "none", "float32")
    assert snapshot_load.converts_at_load(str(tmp_path), "fp8", "bfloat16")
    assert snapshot_load.converts_at_load(str(tmp_path / "model.gguf"), "none", "float32")


@pytest.mark.slow
def test_snapshot_load_benchmark_smoke(tmp_path):
    """The tiny shape quantized to FP8, one run of each case: a table, the ceiling, the goal check,
    each build's profile."""
    out = tmp_path / "result.md"
    command = [
        sys.executable, str(BENCHMARKS / "snapshot_load.py"), "--model-shape", "tiny",
        "--quantization", "fp8", "--dtype", "bfloat16", "--repeats", "1", "--num-kv-blocks", "128",
        "--work-dir", str(tmp_path / "work"), "--out", str(out), "--profile-build",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [data] = json.loads(out.with_suffix(".json").read_text())
    labels = [row["run"] for row in data["rows"]]
    assert labels == [f"fp8 {kind} {cache}" for kind in ("source", "snapshot") for cache in ("cold", "warm")]
    for row in data["rows"]:
        assert "error" not in row, row
        assert 0 < row["imported_s"] <= row["weights_start_s"] <= row["ready_s"] <= row["first_token_s"]
    assert data["ceiling"]["warm_bytes_per_s"] > 0 and len(data["goal"]) == 2
    report = out.read_text()
    assert "| fp8 snapshot cold |" in report and "Goal check:" in report and "read and verified" in report
    # the profiled build names the snapshot's own steps
    assert "Where the weights window went, fp8 snapshot cold" in report and "build_skeleton" in report
