"""The serving benchmark: metric arithmetic on hand-made timestamps, workloads, and a CPU smoke run
of `benchmarks/serving.py` end to end on the tiny shape (fastgen and the HF peer)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from metrics import (  # noqa: E402
    GcPauses,
    RequestRecord,
    ema,
    gaps,
    passes_sla,
    percentiles,
    step_stats,
    summarize_run,
    token_times,
)
from workloads import (  # noqa: E402
    MODEL_SHAPES,
    ShapeArithmetic,
    WorkloadStream,
    parse_workload,
    roofline,
    write_tokenizer,
)

ALPHA = 2 / 17  # span 16


def reference_ema(values: list[float]) -> list[float]:
    """The bias-corrected EMA written out as weighted sums (O(n^2), independent of `ema`)."""
    out = []
    for t in range(len(values)):
        weights = [(1 - ALPHA) ** (t - i) for i in range(t + 1)]
        out.append(sum(w * v for w, v in zip(weights, values)) / sum(weights))
    return out


# -- metrics -----------------------------------------------------------------------------------


def test_token_times_split_merged_deltas_evenly():
    # deltas: 1 token at 1.0, 1 at 1.3, 3 at 1.9 -> the last three share the 0.6 s gap
    times = token_times([1.0, 1.3, 1.9], [1, 1, 3])
    assert times == pytest.approx([1.0, 1.3, 1.5, 1.7, 1.9])
    assert gaps(times) == pytest.approx([0.3, 0.2, 0.2, 0.2])
    # a multi-token first delta: all its tokens arrive with it (no gap before the first token)
    assert token_times([2.0, 2.5], [3, 1]) == pytest.approx([2.0, 2.0, 2.0, 2.5])
    assert token_times([], []) == []


def test_ema_matches_weighted_sums_and_hand_values():
    assert ema([1.0, 0.0, 0.0]) == pytest.approx([1.0, 15 / 32, 225 / 769])
    values = [0.05, 0.3, 0.01, 0.2, 0.2, 0.9, 0.0, 0.07] * 4
    assert ema(values) == pytest.approx(reference_ema(values))
    assert ema([0.25] * 50) == pytest.approx([0.25] * 50)


def test_ema_matches_pandas_when_installed():
    pandas = pytest.importorskip("pandas")
    values = [0.01 * ((i * 37) % 11) for i in range(40)]
    expected = pandas.Series(values).ewm(span=16).mean().tolist()
    assert ema(values, span=16) == pytest.approx(expected)


def test_sla_prompt_deadline_is_prompt_tokens_over_512():
    steady = [0.1] * 20
    assert passes_sla(1024, 2.0, steady, 6)  # TTFT exactly at 1024 / 512 s passes
    assert not passes_sla(1024, 2.01, steady, 2)
    assert passes_sla(100, 0.19, [], 6)  # one generated token: TTFT alone decides
    assert not passes_sla(100, 0.2, [], 6)


def test_sla_token_rate_uses_the_ema_not_the_raw_gaps():
    even = [0.2] * 30
    assert passes_sla(512, 0.5, even, 2) and passes_sla(512, 0.5, even, 4)
    assert not passes_sla(512, 0.5, even, 6)  # 0.2 s > 1/6 s
    # one 1 s stall after a steady 0.1 s: the EMA peaks near 0.21 s -> passes at 4 tokens/s...
    one_stall = [0.1] * 30 + [1.0] + [0.1] * 10
    peak = max(reference_ema(one_stall))
    assert 0.2 < peak < 0.25
    assert passes_sla(512, 0.5, one_stall, 4)
    # ...two stalls in a row push it near 0.3 s: fails at 4 tokens/s, still passes at 2
    two_stalls = [0.1] * 30 + [1.0, 1.0] + [0.1] * 10
    assert 0.25 < max(reference_ema(two_stalls)) < 0.5
    assert not passes_sla(512, 0.5, two_stalls, 4)
    assert passes_sla(512, 0.5, two_stalls, 2)
    # strictly below 1/g: an EMA of exactly 0.25 fails at 4 tokens/s
    assert not passes_sla(512, 0.5, [0.25] * 5, 4)


def test_percentiles_linear_interpolation():
    result = percentiles(range(1, 101))
    assert result["p50"] == pytest.approx(50.5)
    assert result["p90"] == pytest.approx(90.1)
    assert result["p99"] == pytest.approx(99.01)
    assert result["mean"] == pytest.approx(50.5)
    assert percentiles([])["p50"] is None


def _record(index, prompt, submit, arrivals, counts, end, finish="length"):
    record = RequestRecord(index, prompt, sum(counts), submit, list(arrivals), list(counts))
    record.end_s, record.finish_reason = end, finish
    return record


def test_request_summary_and_run_aggregates():
    fast = _record(0, 1024, 0.0, [0.5, 0.6, 0.9], [1, 1, 2], 0.9)  # TTFT 0.5 s, gaps 0.1, 0.15, 0.15
    slow_start = _record(1, 256, 0.0, [1.0, 1.1], [1, 1], 1.1)  # TTFT 1.0 s > 0.5 s allowed
    failed = RequestRecord(2, 64, 8, 0.2)
    failed.error = "boom"
    summaries = [r.summary() for r in (fast, slow_start, failed)]

    first = summaries[0]
    assert first["output_tokens"] == 4 and first["num_deltas"] == 3 and first["max_tokens_per_delta"] == 2
    assert first["ttft_s"] == pytest.approx(0.5) and first["e2e_s"] == pytest.approx(0.9)
    assert first["gaps_ms"] == pytest.approx([100.0, 150.0, 150.0])
    assert first["sla_pass"] == {"2": True, "4": True, "6": True}
    assert summaries[1]["sla_pass"] == {"2": False, "4": False, "6": False}
    assert not summaries[2]["completed"] and summaries[2]["sla_pass"]["2"] is False

    run = summarize_run(summaries, wall_s=2.0)
    assert run["requests_completed"] == 2 and run["requests_failed"] == 1
    assert run["requests_per_s"] == pytest.approx(1.0)
    assert run["output_tokens_per_s"] == pytest.approx(6 / 2.0)
    assert run["total_tokens_per_s"] == pytest.approx((6 + 1024 + 256) / 2.0)
    assert run["effective_requests_per_s"] == pytest.approx({"2": 0.5, "4": 0.5, "6": 0.5})
    assert run["ttft_s"]["p50"] == pytest.approx(0.75)
    assert run["token_latency_s"]["p50"] == pytest.approx(0.125)  # gaps 0.1, 0.1, 0.15, 0.15
    assert run["merged_delta_request_fraction"] == pytest.approx(0.5)


def test_gc_pauses_count_the_collections_of_a_run_and_stop_when_closed():
    import gc

    pauses = GcPauses()
    try:
        gc.collect(0)
        since = pauses.mark()
        gc.collect()
        gc.collect(1)
        summary = pauses.summary(since)
        assert summary["collections"] >= 2 and summary["full_collections"] == 1
        assert summary["max_pause_ms"] > 0.0 and summary["full_pause_ms_sum"] > 0.0
        recorded = pauses.summary()["collections"]
        assert recorded >= 3
    finally:
        pauses.close()
    gc.collect()
    assert pauses.summary()["collections"] == recorded and pauses._on_gc not in gc.callbacks


def test_step_stats_flag_a_step_over_three_medians():
    seconds = [0.010] * 20 + [0.029, 0.031]  # median 10 ms; one step at 3.1x
    tokens = list(range(22))
    stats = step_stats(seconds, tokens)
    assert stats["count"] == 22 and stats["median"] == pytest.approx(10.0)
    assert stats["max"] == pytest.approx(31.0) and stats["max_over_median"] == pytest.approx(3.1)
    assert stats["slow_steps"] == 1 and stats["stall"] and stats["max_step_tokens"] == 21
    assert [step["index"] for step in stats["slowest"][:2]] == [21, 20] and len(stats["slowest"]) == 5
    assert stats["slowest"][0] == {"index": 21, "ms": 31.0, "tokens": 21, "device_ms": None}
    assert stats["max_step_device_ms"] is None
    assert not step_stats([0.010] * 20 + [0.029], list(range(21)))["stall"]
    empty = step_stats([], [])
    assert empty["count"] == 0 and empty["median"] is None and not empty["stall"]
    assert empty["max_over_size_median"] is None and empty["size_slow_steps"] == 0


def test_step_stats_judge_a_step_against_the_steps_of_its_size():
    """Prompt-chunk steps of ~700 tokens at 25 ms beside one-token decodes at 7 ms are 3.6x the run's
    median but their own size's usual; a 700-token step at 80 ms is slow for its size too."""
    seconds = [0.007] * 30 + [0.025] * 6
    tokens = [16] * 30 + [686, 700, 768, 512, 600, 650]
    stats = step_stats(seconds, tokens)
    assert stats["stall"] and stats["max_over_median"] == pytest.approx(25 / 7)
    assert stats["max_over_size_median"] == pytest.approx(1.0) and stats["size_slow_steps"] == 0
    slow = step_stats([*seconds, 0.080], [*tokens, 700])
    assert slow["max_over_size_median"] == pytest.approx(3.2) and slow["size_slow_steps"] == 1
    few = step_stats([0.007] * 30 + [0.025] * 4, [16] * 30 + [700] * 4)  # too few to judge
    assert few["max_over_size_median"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        step_stats([0.1], [])


def test_step_stats_carry_the_slowest_steps_device_time():
    """A step 8x its peers on the wall clock but 10 ms on the device waited for the host."""
    seconds, device = [0.010] * 20 + [0.080], [0.0095] * 20 + [0.010]
    stats = step_stats(seconds, [700] * 21, device_seconds=device)
    assert stats["max_step_device_ms"] == pytest.approx(10.0)
    assert stats["slowest"][0]["device_ms"] == pytest.approx(10.0)
    assert stats["slowest"][1]["device_ms"] == pytest.approx(9.5)
    unmeasured = step_stats(seconds, [700] * 21, device_seconds=[0.0] * 21)  # the CPU runner
    assert unmeasured["max_step_device_ms"] is None
    with pytest.raises(ValueError):
        step_stats([0.1], [1], device_seconds=[])


def test_compile_verdict_fails_on_a_compile_in_a_measured_run():
    from report import compile_verdict, markdown_report

    def row(run, compiles):
        return {"run": run, "token_budget": 768, "steps": 10, "median_ms": 1.0, "max_ms": 2.0,
                "max_over_median": 2.0, "max_step_tokens": 3, "slow_steps": 0, "stall": False,
                "ttft_p99_s": 0.1, "kernel_compiles": compiles}  # fmt: skip

    engines = [{"token_budget": 768, "kernel_compiles_warmup": 2}]
    passed = compile_verdict({"step_checks": [row("a", 0), row("b", 0)], "engines": engines})
    assert passed["status"] == "PASS" and passed["during_measured_runs"] == 0
    assert "2 compiled after start-up" in passed["line"]
    failed = compile_verdict({"step_checks": [row("a", 0), row("b", 3)], "engines": engines})
    assert failed["status"] == "FAIL" and failed["runs_with_compiles"] == ["b"]
    assert "3 Triton kernel variants compiled during measured runs: b (3)" in failed["line"]
    unknown = compile_verdict({"step_checks": [row("a", None)], "engines": []})
    assert unknown["status"] == "UNKNOWN" and unknown["during_measured_runs"] is None
    data = {
        "command": "c", "date": "d", "device": "cpu", "machine": "m", "model": {}, "args": {},
        "step_checks": [row("a", 0), row("b", 3)], "engines": engines,
    }  # fmt: skip
    assert "**3 (FAIL)**" in markdown_report(data, [], method=False)


# -- workloads and arithmetic ------------------------------------------------------------------


def test_workload_stream_is_reproducible_and_normal():
    prompt, gen = parse_workload("1200-128")
    a = WorkloadStream(prompt, gen, vocab_size=32000, max_model_len=4096).take(2000)
    b = WorkloadStream(prompt, gen, vocab_size=32000, max_model_len=4096).take(2000)
    assert [r.prompt_token_ids for r in a[:5]] == [r.prompt_token_ids for r in b[:5]]
    prompts = [r.prompt_tokens for r in a]
    gens = [r.max_new_tokens for r in a]
    mean_p = sum(prompts) / len(prompts)
    std_p = math.sqrt(sum((p - mean_p) ** 2 for p in prompts) / len(prompts))
    assert abs(mean_p - 1200) < 30 and abs(std_p - 360) < 30
    assert abs(sum(gens) / len(gens) - 128) < 4
    assert min(prompts) >= 1 and min(gens) >= 1
    assert all(r.prompt_tokens + r.max_new_tokens <= 4096 for r in a)
    assert min(min(r.prompt_token_ids) for r in a[:50]) >= 3  # no special ids
    assert parse_workload("512-512", 0.02) == (10, 10)
    with pytest.raises(ValueError):
        parse_workload("big")


def test_long_prompts_are_clipped_to_the_context():
    requests = WorkloadStream(2600, 60, vocab_size=100, max_model_len=1000).take(200)
    assert max(r.prompt_tokens for r in requests) == 999
    assert all(r.prompt_tokens + r.max_new_tokens <= 1000 for r in requests)


def test_llama2_7b_arithmetic_and_roofline():
    arithmetic = ShapeArithmetic.from_config(MODEL_SHAPES["llama2-7b"])
    assert arithmetic.total_params == 6_738_415_616  # Llama-2-7B's published count
    assert arithmetic.kv_bytes_per_token == 2 * 32 * 4096 * 2
    assert arithmetic.decode_weight_bytes == 2 * (6_738_415_616 - 32000 * 4096)
    fp8 = ShapeArithmetic.from_config(MODEL_SHAPES["llama2-7b"], linear_bytes=1)
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert fp8.decode_weight_bytes == arithmetic.decode_weight_bytes - linears
    # two requests of prompt 100, 11 tokens; matmul 1e15 FLOP/s, copy 1e12 B/s, cache for one at a time
    bound = roofline(
        arithmetic, [(100, 11), (100, 11)], matmul_flops_per_s=1e15, copy_bytes_per_s=1e12,
        kv_capacity_tokens=150, max_seqs=8,
    )  # fmt: skip
    per_prompt = 2 * arithmetic.layer_params * 100 + 4 * 32 * 4096 * 5050 + 2 * 32000 * 4096
    assert bound["prefill_flops"] == pytest.approx(2 * per_prompt)
    assert bound["concurrency"] == 1 and bound["decode_steps"] == 20
    assert bound["decode_s"] == pytest.approx(20 * arithmetic.decode_weight_bytes / 1e12)
    assert bound["roofline_s"] == pytest.approx(2 * per_prompt / 1e15 + bound["decode_s"])
    kv_tokens = 2 * sum(100 + j for j in range(1, 11))
    assert bound["kv_read_s"] == pytest.approx(kv_tokens * arithmetic.kv_bytes_per_token / 1e12)


@pytest.mark.parametrize("vocab_size", [300, 32000, 128256])
def test_tokenizer_has_the_requested_size_and_every_id_decodes(tmp_path, vocab_size):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == vocab_size and tokenizer.eos_token_id == 2
    # byte-level: every non-special token is a string over the 256 byte symbols, and no two ids
    # stand for the same bytes (the vocabulary maps one to one onto byte strings)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    tokens = tokenizer.convert_ids_to_tokens(list(range(3, vocab_size)))
    assert all(token and set(token) <= alphabet for token in tokens)
    assert len(set(tokens)) == len(tokens)
    assert isinstance(tokenizer.decode(list(range(3, vocab_size))), str)
    # text round-trips, and a big vocabulary makes tokens longer than two bytes
    text = "Hello wörld, 日本語 text\n\tand 12345 more 🙂 " * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert max(ids) < vocab_size
    longest = max(len(token) for token in tokens)
    assert longest == (3 if vocab_size > 3 + 256 + 256**2 else 2 if vocab_size > 3 + 256 else 1)


def test_llama3_8b_shape_matches_the_published_model():
    config = MODEL_SHAPES["llama3-8b"]
    assert config["num_key_value_heads"] == 8 and config["rope_theta"] == 500000.0
    assert config["max_position_embeddings"] == 8192 and not config["tie_word_embeddings"]
    arithmetic = ShapeArithmetic.from_config(config)
    assert arithmetic.total_params == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert arithmetic.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_budget_skips_and_says_why():
    from serving import OUTPUT_RESERVE_S, Budget

    budget = Budget(limit_s=OUTPUT_RESERVE_S + 100, max_run_s=30)
    assert budget.allows("a run")
    assert budget.deadline() - time.perf_counter() == pytest.approx(30, abs=1)
    assert budget.allows("a long run, cut at 30 s", estimate_s=500)
    uncut = Budget(limit_s=OUTPUT_RESERVE_S + 100, max_run_s=None)
    assert not uncut.allows("a long run", estimate_s=500)
    short = Budget(limit_s=OUTPUT_RESERVE_S + 20, max_run_s=30)
    assert not short.allows("a run cut at 30 s", estimate_s=500)
    spent = Budget(limit_s=OUTPUT_RESERVE_S + 1, max_run_s=None)
    assert not spent.allows("late run")
    skipped = budget.skipped + uncut.skipped + short.skipped + spent.skipped
    assert [s.split(":")[0] for s in skipped] == ["a long run", "a run cut at 30 s", "late run"]


def _benchmark_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # a tiny model: threads only fight over a busy CI machine's cores
    }


# -- end to end --------------------------------------------------------------------------------


def test_serving_benchmark_smoke(tmp_path):
    """The whole driver on the tiny shape: fastgen (batch-1, offline, two client counts) and the
    HF peer, then the JSON, markdown and plots."""
    command = [
        sys.executable, str(BENCHMARKS / "serving.py"),
        "--model-shape", "tiny", "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
        "--workloads", "1200-128,512-512", "--scale", "0.02", "--clients", "1,2",
        "--offline-requests", "6", "--batch1", "16,8", "--batch1-repeats", "1",
        "--peer-requests", "2", "--peer-batch1-tokens", "4", "--peer-num-blocks", "32",
        "--peer-max-batch-tokens", "256", "--num-kv-blocks", "256", "--time-limit-s", "600",
        "--shared-prefix", "48,8,4", "--shared-prefix-clients", "2", "--offline-token-budgets", "768,64",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=_benchmark_env(), check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tail = done.stdout.strip().splitlines()
    assert "## Summary" in "\n".join(tail[-30:]) and tail[-1].startswith("| skipped / errors | 0 / 0")

    [json_path] = (tmp_path / "out").glob("serving-cpu-*.json")
    data = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").is_file()
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert data["errors"] == [] and data["skipped"] == []
    phases = [entry["what"] for entry in data["timeline"]]
    assert phases[:3] == ["model dir", "peer", "engine start"] and "offline/1200-128" in phases
    assert data["model"]["params"] == data["peer"]["params"]  # the peer built the same shape

    runs = {run["name"]: run for run in data["runs"]}
    prefix_runs = {"prefix 48+8-4 distinct/c2", "prefix 48+8-4 shared/c2"}
    offline_runs = {"offline/1200-128", "offline/1200-128/budget64"}
    assert (
        set(runs) == {"1200-128/c1", "1200-128/c2", "512-512/c1", "512-512/c2"} | prefix_runs | offline_runs
    )
    # the second offline budget ran on its own engine, after the main one stopped, on the same requests
    assert [engine["token_budget"] for engine in data["engines"]] == [768, 64]
    assert "engine start (token budget 64)" in phases and phases.index("engine start (token budget 64)") > (
        phases.index("512-512/c1")
    )
    budget64, budget768 = runs["offline/1200-128/budget64"], runs["offline/1200-128"]
    assert (budget64["token_budget"], budget768["token_budget"]) == (64, 768)
    assert [r["prompt_tokens"] for r in budget64["requests"]] == [
        r["prompt_tokens"] for r in budget768["requests"]
    ]
    assert budget64["engine_stats"]["steps"] > budget768["engine_stats"]["steps"]  # 64 tokens a step at most
    assert budget64["engine_stats"]["step_ms"]["max_step_tokens"] <= 64

    # a stall row for every measured run (the batch-1 repeat too), and the compile verdict
    checks = {row["run"]: row for row in data["step_checks"]}
    assert set(checks) == set(runs) | {"batch1 #1"}
    for row in checks.values():
        assert row["steps"] > 0 and 0 < row["median_ms"] <= row["max_ms"]
        assert row["max_over_median"] == pytest.approx(row["max_ms"] / row["median_ms"])
        assert row["stall"] == (row["slow_steps"] > 0) and row["ttft_p99_s"] > 0
        assert row["kernel_compiles"] in (0, None)  # no Triton on a CPU (None: the engine does not count)
        assert row["gc_full_collections"] >= 0 and row["gc_max_pause_ms"] >= 0.0
    verdict = data["kernel_compiles"]
    assert verdict["status"] in ("PASS", "UNKNOWN") and verdict["runs_with_compiles"] == []
    markdown = json_path.with_suffix(".md").read_text()
    assert (
        "## Stalls and kernel compiles" in markdown
        and f"Kernel compiles: **{verdict['status']}**" in markdown
    )
    # 40 prompts of 56 tokens; with a shared 48-token prefix, all but the first few find 3 blocks
    assert runs["prefix 48+8-4 distinct/c2"]["prefix_cache_hit_tokens"] == 0
    assert runs["prefix 48+8-4 shared/c2"]["prefix_cache_hit_tokens"] >= 36 * 48
    assert runs["1200-128/c2"]["requests_planned"] == 4 * 2 + 32
    c2 = runs["1200-128/c2"]["summary"]
    met = " / ".join(f"{c2['sla_passed'][g] / c2['requests_completed']:.0%}" for g in ("2", "4", "6"))
    assert "SLA met g=2 / 4 / 6" in markdown and f"| {met} |" in markdown
    for run in runs.values():
        summary = run["summary"]
        assert not run["truncated"] and summary["requests_completed"] == run["requests_planned"]
        for key in (
            "requests_per_s",
            "output_tokens_per_s",
            "total_tokens_per_s",
            "effective_requests_per_s",
        ):
            assert key in summary
        assert set(summary["token_latency_s"]) == {"p50", "p90", "p95", "p99", "mean"}
        assert run["engine_stats"]["steps"] > 0
        for request in run["requests"]:
            # ignore_eos: exactly max_new_tokens each, one gap per token after the first
            assert request["output_tokens"] == request["max_new_tokens"]
            assert len(request["gaps_ms"]) == request["output_tokens"] - 1
            assert 0 < request["ttft_s"] <= request["e2e_s"]
    assert data["batch1"]["decode_tokens_per_s"] > 0
    assert data["batch1"]["repeats"][0]["new_tokens"] == 8
    peer = data["peer"]["continuous_batching"]["summary"]
    assert peer["requests_completed"] == 2 and peer["output_tokens"] > 0
    assert data["peer"]["generate_batch1"]["new_tokens"] == 4
    # the static-cache peer ran uncompiled on the CPU (generate compiles only on accelerators)
    static = data["peer"]["generate_batch1_static"]
    assert static["cache_implementation"] == "static" and static["new_tokens"] == 4 and not static["compiled"]
    assert static["decode_tokens_per_s"] > 0


def test_a_run_starts_after_the_last_runs_steps_are_in():
    """`Driver.settle` (called first by `Driver.run`) returns only once no request is held and no
    step is in flight: a step launched ahead for requests that finished is reported before the
    next run marks its first step, so no run counts it."""
    import asyncio
    from types import SimpleNamespace

    from serving import Driver

    async def main():
        held = {"running": 1}
        engine = SimpleNamespace(
            core=SimpleNamespace(next_result=asyncio.get_running_loop().create_future()),
            stats=lambda: SimpleNamespace(num_running=held["running"], num_waiting=0),
            step_listeners=[],
        )
        settle = asyncio.create_task(Driver(engine).settle())
        await asyncio.sleep(0.05)
        assert not settle.done()  # a request is still held
        held["running"] = 0
        await asyncio.sleep(0.05)
        assert not settle.done()  # a step is still in flight
        engine.core.next_result = None
        await asyncio.wait_for(settle, 1.0)

    asyncio.run(main())


def test_startup_benchmark_smoke(tmp_path):
    """Two fresh engine processes on the tiny shape sharing one (new) Triton cache directory."""
    cache = tmp_path / "triton-cache"
    command = [
        sys.executable, str(BENCHMARKS / "startup.py"), "--model-shape", "tiny",
        "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--num-kv-blocks", "128",
        "--scale", "0.02", "--first-prompt", "16", "--decode-tokens", "4", "--triton-cache-dir", str(cache),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=_benchmark_env(), check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [json_path] = (tmp_path / "out").glob("startup-cpu-*.json")
    data = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").is_file() and data["triton_cache_dir"] == str(cache)
    assert [run["run"] for run in data["runs"]] == ["cold", "warm"]
    for run in data["runs"]:
        assert "error" not in run
        assert 0 < run["interpreter_s"] <= run["imported_s"] <= run["ready_s"] <= run["first_token_s"]
        assert run["first_token_s"] <= run["process_s"] and run["warm_workload_requests"] == 2 * 8 + 1
        assert run["kernel_compiles_after_warm_workload"] in (0, None)  # no Triton on a CPU
    assert data["verdict"].startswith("Ready after") and "| cold |" in done.stdout


# -- FlashInfer peer (CPU: the conversion and the calls' plumbing; the kernels need a GPU) -------------


class _FakeDecodeWrapper:
    """FlashInfer 0.6.14's decode wrapper signatures, computing with the CSR reference."""

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_tensor_cores=False):
        assert kv_layout == "NHD"

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
             pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16",
             kv_data_type=None, sm_scale=None, **unused):  # fmt: skip
        assert pos_encoding_mode == "NONE" and window_left == -1 and head_dim == 128 and page_size == 16
        self.table = (indptr, indices, last_page_len)
        self.scale, self.heads = sm_scale, (num_qo_heads, num_kv_heads)

    def query_start(self, query):
        return torch.arange(query.shape[0] + 1, dtype=torch.int32)

    def run(self, q, paged_kv_cache, *args, out=None, **unused):
        import flashinfer_peer

        key_cache, value_cache = paged_kv_cache
        assert (q.shape[1], key_cache.shape[2]) == self.heads
        out[:] = flashinfer_peer.csr_attention_reference(
            q, key_cache, value_cache, self.query_start(q), *self.table, self.scale
        )
        return out


class _FakePrefillWrapper(_FakeDecodeWrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", backend="auto"):
        assert kv_layout == "NHD" and backend in ("auto", "fa2")

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None,
             packed_custom_mask=None, causal=False, pos_encoding_mode="NONE", sm_scale=None,
             **unused):  # fmt: skip
        assert causal and custom_mask is None and head_dim_qk == 128 and page_size == 16
        self.qo_indptr = qo_indptr
        self.table = (paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)
        self.scale, self.heads = sm_scale, (num_qo_heads, num_kv_heads)

    def query_start(self, query):
        return self.qo_indptr


def test_flashinfer_peer_feeds_flashinfer_the_same_attention():
    import types

    import flashinfer_peer
    from fastgen.kernels.attention import paged_attention_reference
    from flashinfer_peer import VARIANTS, cases, flashinfer_call, flashinfer_page_table, paged_batch

    # the page table: pages in order, the last one's fill, for a shuffled padded block table
    block_tables = torch.tensor([[7, 2, 9], [4, 0, 0], [1, 3, 0]], dtype=torch.int32)
    indptr, indices, last = flashinfer_page_table(block_tables, torch.tensor([33, 16, 17]), 16)
    assert indptr.tolist() == [0, 3, 4, 6] and indices.tolist() == [7, 2, 9, 4, 1, 3]
    assert last.tolist() == [1, 16, 1]

    fake = types.SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=_FakeDecodeWrapper,
        BatchPrefillWithPagedKVCacheWrapper=_FakePrefillWrapper,
    )
    for case in cases(smoke=True):
        batch = paged_batch(case, "cpu", torch.float32)
        expected = paged_attention_reference(**batch, scale=128**-0.5)
        variants = [v for v in VARIANTS if v.kind == case.kind]
        assert len(variants) == 2
        for variant in variants:
            out = flashinfer_call(variant, variant.make(fake, torch.empty(0)), case, batch)()
            assert flashinfer_peer.relative_error(out, expected) < 1e-6, (case.name, variant.label)
        # a wrong page table does not pass for the same data
        broken = dict(batch, block_tables=batch["block_tables"].roll(1, dims=0))
        wrong = flashinfer_call(variants[0], variants[0].make(fake, torch.empty(0)), case, broken)()
        assert flashinfer_peer.relative_error(wrong, expected) > 0.1


def test_flashinfer_peer_exits_cleanly_without_cuda(capsys):
    import flashinfer_peer

    assert not torch.cuda.is_available()
    assert flashinfer_peer.main([]) == 0
    assert "SKIPPED: no CUDA device" in capsys.readouterr().out
    assert flashinfer_peer.main(["--smoke"]) == 0  # the CPU check of the conversion
    assert "smoke: worst relative error 0.0e+00" in capsys.readouterr().out


def test_cpu_generate_benchmark_smoke(tmp_path, capsys):
    """fastgen against HF generate on a tiny random model, two batch sizes; JSON, markdown, PNG."""
    import cpu_generate

    import fastgen

    argv = ["--toy", "--prompts", "3", "--new-tokens", "4", "--batch-sizes", "1,2", "--repeats", "1"]
    argv += ["--reference-attention", "--out", str(tmp_path)]
    assert cpu_generate.main(argv) == 0
    [json_path] = tmp_path.glob("cpu_generate-*.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file()
    data = json.loads(json_path.read_text())
    assert data["command"].endswith(" ".join(argv)) and data["machine"] and data["prompts"] == 3
    assert not data["chat_template"]  # the toy tokenizer has none: plain prompts
    assert [row["batch_size"] for row in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["output_tokens"] == 3 * 4 and row["fastgen_s"] > 0 and row["hf_s"] > 0
        assert row["fastgen_over_hf"] == pytest.approx(row["hf_s"] / row["fastgen_s"])
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["threads"] == data["threads"][0] and row["ceiling_tokens_per_s"] > 0
        assert row["fastgen_reference_s"] > 0 and 0.0 <= row["reference_agreement"] <= 1.0
    checkout = str(Path(fastgen.__file__).resolve().parent.parent)
    assert data["fastgen"].startswith(checkout)  # the fastgen measured, for before/after runs
    [by_threads] = data["ceilings"]["threads"].values()
    assert by_threads["read_gb_per_s"] > 0 and by_threads["matmul_gflop_per_s"] > 0
    assert "| threads | batch size | fastgen s |" in capsys.readouterr().out


def test_soak_benchmark_smoke(tmp_path, llama_path):
    """Mixed requests through ``fastgen serve`` on the toy model, many malformed or left early: none
    lost, the malformed refused, the server idle again and stopped cleanly; JSON and markdown."""
    import soak

    argv = ["--requests", "40", "--concurrency", "8", "--model", llama_path, "--max-tokens", "8"]
    argv += ["--bad-rate", "0.2", "--disconnect-rate", "0.3", "--out", str(tmp_path)]
    assert soak.main(argv) == 0
    [json_path] = tmp_path.glob("soak-*.json")
    assert json_path.with_suffix(".md").is_file()
    data = json.loads(json_path.read_text())
    outcomes = data["summary"]["outcomes"]
    assert sum(outcomes.values()) == 40 and "lost" not in outcomes and "not refused" not in outcomes
    assert outcomes["completed"] > 0 and outcomes["refused"] > 0 and outcomes["disconnected"] > 0
    assert data["idle"]["reached"] and data["server_exit_code"] == 0 and data["server_log_tracebacks"] == 0
    assert data["command"].endswith(" ".join(argv)) and data["config"]["oversubscription"] > 1


def test_engine_overhead_benchmark_smoke():
    """Every setting runs through a real engine, the runner that launches apart from collecting
    (a simulated device queue) included: one table row each."""
    command = [sys.executable, str(BENCHMARKS / "engine_overhead.py"), "--device-ms", "1", "--clients", "2"]
    command += ["--tokens", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    import engine_overhead

    settings = [tuple(cell.strip() for cell in row.split("|")[2:5]) for row in rows]
    assert settings == [tuple(str(flag) for flag in setting) for setting in engine_overhead.SETTINGS]
    assert len(settings) == 4 and ("True", "True", "True") in settings


def test_versions_name_the_commit_given_for_a_tree_without_its_git(monkeypatch):
    from serving import _versions

    monkeypatch.setenv("FASTGEN_COMMIT", "0123abc")
    assert _versions()["fastgen_commit"] == "0123abc"
    monkeypatch.delenv("FASTGEN_COMMIT")
    assert _versions()["fastgen_commit"] != "0123abc"  # this checkout's own HEAD (or None without git)


def test_decode_step_setting_comparisons_parse():
    """benchmarks/decode_step.py --fusions-off / --pdl (the run itself needs a GPU): settings, the
    default batches, one kind of setting a run, the table against the first setting."""
    import decode_step

    args = decode_step.parse_args(["--fusions-off", ",gated_down,norm_linear+rotary_kv,all"])
    assert args.fusions_off == ["", "gated_down", "norm_linear,rotary_kv", "all"]
    assert args.compared == "fusions_off" and args.batches == [1, 8]
    assert decode_step.parse_args([]).batches == [1, 8, 32, 64, 128]
    args = decode_step.parse_args(["--pdl", "1,0", "--batches", "1"])
    assert (args.compared, args.pdl, args.batches) == ("pdl", ["1", "0"], [1])
    with pytest.raises(SystemExit):
        decode_step.parse_args(["--pdl", "1,0", "--fusions-off", "all"])
    rows = [dict(setting=setting, batch=1, step_ms=step_ms, floor_ms=4.5, of_floor=4.5 / step_ms,
                 tokens_per_s=1e3 / step_ms) for setting, step_ms in [("", 5.0), ("all", 6.0)]]  # fmt: skip
    table = decode_step.settings_table(rows, "FASTGEN_FUSIONS_OFF")
    assert "| FASTGEN_FUSIONS_OFF | batch |" in table and "| vs (empty) |" in table
    assert "| (empty) | 1 | 5.000 | 4.500 | 90.0% | 200 | +0.0% |" in table
    assert "| all | 1 | 6.000 | 4.500 | 75.0% | 167 | +20.0% |" in table


def test_attention_launch_sweep_sets_only_the_launch_configs_keys_and_counts_causal_flops():
    from fastgen.kernels.attention_triton import launch_config

    from benchmarks.attention_launch_sweep import LAUNCHES, Shape

    config = launch_config(128, 4, torch.bfloat16)
    for launch in LAUNCHES.values():
        assert set(launch.keys) <= set(config)
        for configs in launch.configs.values():
            assert configs and all(len(values) == len(launch.keys) for values in configs)
    # two sequences of 5 new tokens at context 9: the i-th new token sees 9 - 5 + i + 1 keys
    shape = Shape("x", seqs=2, query_len=5, context=9, heads=2, kv_heads=1)
    keys_seen = sum(9 - 5 + i + 1 for i in range(5))
    assert shape.flops == 4 * 2 * 2 * 128 * keys_seen
    assert shape.kv_elements == 2 * 9 * 1 * 128 * 2


def test_sm90_compile_reports_an_h100_compile_of_the_attention_launches():
    """The CPU compile for sm_90 (a subprocess: the test session runs Triton's interpreter, which
    replaces the kernels): the chunk launch's prompt dots are Hopper wgmma, the decode branch's
    mma.sync, and the resources are read from the cubin."""
    import json
    import os
    import subprocess
    import sys

    from benchmarks.sm90_compile import parse_config

    assert parse_config("m128n64w8s3") == {"m": 128, "n": 64, "w": 8, "s": 3}
    assert parse_config("n128w4s2") == {"n": 128, "w": 4, "s": 2}
    with pytest.raises(ValueError, match="expected"):
        parse_config("m128n64")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sm90_compile", "--configs", "m64n64w4s2", "--json"],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)["configs"]["m64n64w4s2"]
    assert figures["wgmma"] > 0 and figures["mma_sync"] > 0
    assert 32 < figures["registers"] <= 255 and figures["shared_bytes"] > 0
    assert figures["sass"]["HGMMA"] == figures["wgmma"]


def test_step_shapes_simulates_the_scheduler_to_the_end_and_models_decode_rounds():
    """benchmarks/step_shapes.py: every prompt token is prefilled once and every request decodes
    its tokens but the first (sampled by its last prompt chunk); no step exceeds the budget."""
    from benchmarks import step_shapes

    prompts, new_tokens = [30, 70, 5, 120, 64, 9], [4, 1, 12, 3, 8, 2]
    shapes = step_shapes.simulate(prompts, new_tokens, token_budget=64, max_seqs=4, kv_tokens=4096)
    assert sum(s.prompt_tokens for s in shapes) == sum(prompts)
    assert sum(s.decodes for s in shapes) == sum(n - 1 for n in new_tokens)
    assert all(0 < s.decodes + s.prompt_tokens <= 64 and s.decodes <= 4 for s in shapes)
    assert any(s.decodes and s.prompt_tokens for s in shapes)  # Dynamic SplitFuse mixes them
    # 528 resident programs (132 SMs x 4): 66 decodes x 8 heads fill one round exactly (unsplit);
    # 75 (1.14 rounds) split 4 ways: 4.55 rounds of quarter-length programs, the last at its 0.65
    # floor, plus the split's 5%; 16 decodes (a quarter round) split 4 ways to fill one round
    assert step_shapes.decode_launch(66, 8, 132) == (1, 1.0)
    splits, efficiency = step_shapes.decode_launch(75, 8, 132)
    assert splits == 4 and abs(efficiency - (600 / 528) / (4.65 / 4 * 1.05)) < 1e-9
    splits, efficiency = step_shapes.decode_launch(16, 8, 132)
    assert splits == 4 and abs(efficiency - (128 / 528) / (512 / 528 / 4 * 1.05)) < 1e-9
    report = step_shapes.report(shapes, kv_heads=8, sms=132)
    assert f"- steps: {len(shapes)} (" in report and "| decodes a step |" in report
