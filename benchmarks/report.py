"""Markdown for the serving benchmark: the full report and the short summary printed last.

python benchmarks/report.py benchmarks/results/serving-....json   # re-render a (partial) result
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHOD = """\
## Method

- Workloads: prompt and generation lengths ~ N(mean, 0.3 mean), rounded, clipped to >= 1 and to the
  context; random prompt ids (no special ids); seed 42; `ignore_eos`. Each run takes the next
  requests of its workload's stream, so no prompt repeats across runs.
- Closed loop: N clients pull from one queue; `4 N + 32` requests a run; the offline run submits
  every request at once. Wall time: first submission to last completion.
- Token times: a delta of k tokens is spread evenly over the time since the previous delta (gaps
  sum to the decode time); `merged` is the share of requests that ever got a multi-token delta.
  Token latency percentiles are over every inter-token gap of every completed request.
- Effective throughput (FastGen): a request passes at g tokens/s if TTFT <= prompt_tokens / 512 s
  and the EMA (span 16, bias-corrected as pandas `ewm(span=16).mean()`) of its gaps stays < 1/g s;
  passing requests / wall time.
- HBM floor: decode weight bytes (all weights but the input embedding) / measured copy bandwidth
  (1 GiB device-to-device copy, bytes read + written).
- Roofline (offline): prefill FLOPs (2 x layer params x prompt tokens + causal attention
  4 x layers x heads x head_dim x L(L+1)/2 + LM head once per prompt) / measured bf16 8192^3 matmul
  rate, plus decode steps x decode weight bytes / copy bandwidth, with decode steps =
  max(max(g) - 1, ceil(sum(g - 1) / C)) and C = min(max_seqs, KV tokens // mean(prompt + gen)).
  The KV-read term (each decode token reads its context's KV once) is shown beside it.
- Stalls: per measured run, the engine's step times (from its step listener) after start-up and
  the benchmark's warm-up; a run stalls when any step takes more than 3x the run's median step.
  Kernel compiles: `EngineStats.kernel_compiles` (Triton kernel variants compiled since the engine
  became ready) read before and after each run; any compile inside a measured run fails the
  benchmark (exit status 1); those of the warm-up are reported as compiled after start-up.
- Engine busy: the sum of the engine's step times (schedule + execute + commit, from its step
  listener) / wall time; client overhead: the driver's own bookkeeping per delta / wall time.
- Peer: HF transformers, same config, random weights, same requests (a subset), in a child process
  before fastgen starts: `generate` at batch 1, eager and with `cache_implementation="static"`
  (which `generate` compiles with torch.compile on a GPU; warmed with one full `generate` of the
  same shape, outside the timing), and continuous batching (the manager that `generate_batch`
  drives), all requests at once, per-token timestamps from transformers.
- Offline token budgets: each budget other than the main engine's runs on its own engine, started
  after the previous one stopped; the roofline's concurrency C uses that engine's KV capacity.
"""


def _f(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _slash(values: dict[str, float | None], keys: tuple[str, ...], digits: int, scale: float = 1.0) -> str:
    return " / ".join(_f(values[key], digits, scale) for key in keys)


def _runs(data: dict[str, Any], workload: str | None = None, offline: bool = False) -> list[dict[str, Any]]:
    return [
        r for r in data.get("runs", [])
        if r.get("offline") == offline and (workload is None or r.get("workload") == workload)
    ]  # fmt: skip


def _header(data: dict[str, Any]) -> list[str]:
    model = data.get("model", {})
    lines = [
        "# Serving benchmark: fastgen vs HF transformers",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}",
        f"- device: {data['device']}; machine: {data['machine']}",
        f"- versions: {data.get('versions', {})}",
        f"- model: {model.get('shape')} shape, dummy weights, {model.get('params', 0) / 1e9:.2f} G params; "
        f"a decode step reads {model.get('decode_weight_bytes', 0) / 1e9:.2f} GB of weights; "
        f"KV {model.get('kv_bytes_per_token', 0) / 1024:.0f} KiB/token",
    ]
    engine = data.get("engine")
    if engine:
        config = engine["config"]
        lines.append(
            f"- engine: token_budget {config['token_budget']}, max_seqs {config['max_seqs']}, "
            f"dtype {config['dtype']}, quantization {config.get('quantization')}, "
            f"KV cache {config.get('kv_cache_dtype', 'auto')}, cuda_graphs {config['cuda_graphs']}; "
            f"KV {engine['kv_blocks']} blocks = {engine['kv_tokens']} tokens; "
            f"start {engine['start_s']:.1f} s, warm-up {_f(engine.get('warmup_s'))} s"
        )
    for other in data.get("engines", [])[1:]:
        lines.append(
            f"- engine for the offline run at token budget {other['token_budget']}: KV {other['kv_tokens']} "
            f"tokens; start {other['start_s']:.1f} s, warm-up {_f(other.get('warmup_s'))} s; GPU memory "
            f"free before its start {_f(other.get('gpu_free_bytes_before_start'), 1, 2**-30)} GiB"
        )
    ceilings = data.get("ceilings")
    if ceilings:
        lines.append(
            "- ceilings (measured in this run): "
            f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
            f"bf16 matmul {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; "
            f"HBM floor {ceilings['hbm_floor_s_per_token'] * 1000:.2f} ms/token "
            f"= {ceilings['hbm_floor_tokens_per_s']:.1f} tokens/s"
        )
    else:
        lines.append("- ceilings: not measured (no GPU)")
    return lines


def _batch1(data: dict[str, Any]) -> list[str]:
    batch1, peer = data.get("batch1"), (data.get("peer") or {}).get("generate_batch1")
    if not batch1 and not peer:
        return []
    prompt, new = data["args"]["batch1"]
    floor = (data.get("ceilings") or {}).get("hbm_floor_tokens_per_s")
    lines = [
        "",
        f"## Batch-1 decode (prompt {prompt})",
        "",
        "| engine | new tokens | decode tokens/s | TTFT ms | vs HBM floor |",
        "|---|---|---|---|---|",
    ]
    if batch1:
        rate = batch1["decode_tokens_per_s"]
        ratio = f"{rate / floor:.0%}" if rate and floor else "-"
        ttft = batch1["repeats"][-1]["ttft_s"]
        label = f"fastgen (median of {len(batch1['repeats'])})"
        lines.append(f"| {label} | {new} | {_f(rate)} | {_f(ttft, 1, 1e3)} | {ratio} |")
    peers = [("HF `generate`", peer), *_static_peer(data)]
    for label, result in peers:
        if not result:
            continue
        rate = result["decode_tokens_per_s"]
        ratio = f"{rate / floor:.0%}" if rate and floor else "-"
        lines.append(
            f"| {label} | {result['new_tokens']} | {_f(rate)} | {_f(result['ttft_s'], 1, 1e3)} | {ratio} |"
        )
    static = (data.get("peer") or {}).get("generate_batch1_static") or {}
    if static.get("warmup_s") is not None:
        lines += [
            "",
            f"The static-cache peer's warm-up (one full `generate` of the same shape"
            f"{', which compiles the forward' if static.get('compiled') else ''}) took "
            f"{static['warmup_s']:.1f} s, outside the timing.",
        ]
    return lines


def _static_peer(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The batch-1 peer with a static cache, labelled by whether its forward was compiled."""
    static = (data.get("peer") or {}).get("generate_batch1_static")
    if not static:
        return []
    how = "+ torch.compile" if static.get("compiled") else "(not compiled)"
    return [(f"HF `generate`, static cache {how}", static)]


def _run_row(
    label: str, s: dict[str, Any], planned: int | str, truncated: bool, token_budget: int | str,
    bound: dict[str, Any],
) -> str:  # fmt: skip
    ttft, itl = s["ttft_s"], s["token_latency_s"]
    cut = " (cut)" if truncated else ""
    if "roofline_s" in bound:
        roof = f"{bound['roofline_s']:.1f} ({bound['roofline_with_kv_s']:.1f})"
        ratio = f"{bound['measured_over_roofline']:.2f}x ({bound['measured_over_roofline_with_kv']:.2f}x)"
    else:
        roof = ratio = "-"
    return (
        f"| {label} | {token_budget} | {s['requests_completed']}/{planned}{cut} | {s['wall_s']:.1f} | "
        f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.0f} | {s['total_tokens_per_s']:.0f} | "
        f"{_slash(ttft, ('p50', 'p99'), 3)} | {_slash(itl, ('p50', 'p99'), 1, 1e3)} | {roof} | {ratio} |"
    )


def _offline(data: dict[str, Any]) -> list[str]:
    runs = _runs(data, offline=True)
    peer = (data.get("peer") or {}).get("continuous_batching")
    if not runs and not peer:
        return []
    name = runs[0]["workload"] if runs else data["args"]["workloads"].split(",")[0]
    lines = [
        "",
        f"## Offline: {name}, every request submitted at once",
        "",
        "| engine | token budget | requests | wall s | req/s | out tok/s | total tok/s | TTFT p50 / p99 s "
        "| token p50 / p99 ms | roofline s (+KV reads) | measured / roofline (+KV) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        bound = run.get("roofline") or (data.get("offline_roofline") if run is runs[0] else None) or {}
        lines.append(
            _run_row("fastgen", run["summary"], run["requests_planned"], run["truncated"],
                     run.get("token_budget", data["args"]["token_budget"]), bound)
        )  # fmt: skip
    if peer:
        lines.append(
            _run_row(
                "HF continuous batching", peer["summary"], data["peer"]["requests_submitted"],
                peer["truncated"], "-", {},
            )
        )  # fmt: skip
    if runs and peer and peer["summary"]["output_tokens_per_s"]:
        best = max(run["summary"]["output_tokens_per_s"] for run in runs)
        ratio = best / peer["summary"]["output_tokens_per_s"]
        lines += ["", f"fastgen (best budget) / HF output tokens/s: **{ratio:.1f}x** (the peer ran a subset)"]
    bound = (runs[0].get("roofline") if runs else None) or data.get("offline_roofline") or {}
    if "roofline_s" in bound:
        lines += [
            "",
            f"Roofline of the first run: prefill {bound['prefill_flops'] / 1e15:.2f} PFLOP -> "
            f"{bound['prefill_s']:.2f} s; {bound['decode_steps']} decode steps (C = {bound['concurrency']}) "
            f"-> {bound['decode_s']:.2f} s; roofline **{bound['roofline_s']:.2f} s**, "
            f"measured {bound['measured_s']:.2f} s = **{bound['measured_over_roofline']:.2f}x**. "
            f"With the KV reads ({bound['kv_read_s']:.2f} s): {bound['roofline_with_kv_s']:.2f} s, "
            f"measured = {bound['measured_over_roofline_with_kv']:.2f}x. (C, and so the bound, depends on "
            "each engine's KV capacity.)",
        ]
    elif bound.get("note"):
        lines += ["", f"Roofline: {bound['note']}"]
    return lines


def _step_checks(data: dict[str, Any]) -> list[str]:
    """Stalls and kernel compiles: one row per measured run, then the verdict."""
    rows = data.get("step_checks") or []
    if not rows:
        return []
    lines = [
        "",
        "## Stalls and kernel compiles (every measured run)",
        "",
        "| run | token budget | steps | median step ms | max step ms | max / median | tokens in max step "
        "| device ms of the max step | steps > 3x median | max / median of its size | TTFT p99 s "
        "| kernels compiled | full GCs | longest GC pause ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        flag = " **STALL**" if row["stall"] else ""
        compiled = "unknown" if row["kernel_compiles"] is None else str(row["kernel_compiles"])
        if row["kernel_compiles"]:
            compiled = f"**{compiled} (FAIL)**"
        lines.append(
            f"| {row['run']} | {row['token_budget']} | {row['steps']} | {_f(row['median_ms'], 2)} | "
            f"{_f(row['max_ms'], 1)} | {_f(row['max_over_median'], 1)}x{flag} | {row['max_step_tokens']} | "
            f"{_f(row.get('max_step_device_ms'), 1)} | "
            f"{row['slow_steps']} | {_ratio(row.get('max_over_size_median'))} | {_f(row['ttft_p99_s'], 3)} | "
            f"{compiled} | "
            f"{row.get('gc_full_collections', '-')} | {_f(row.get('gc_max_pause_ms'), 1)} |"
        )
    verdict = data.get("kernel_compiles") or compile_verdict(data)
    lines += ["", f"Kernel compiles: **{verdict['status']}**: {verdict['line']}"]
    for engine in data.get("engines", []):
        warm = engine.get("kernel_compiles_warmup")
        lines.append(
            f"- engine at token budget {engine['token_budget']}: compiled after start-up (during the "
            f"benchmark's warm-up): {'unknown' if warm is None else warm}"
        )
    return lines


def compile_verdict(data: dict[str, Any]) -> dict[str, Any]:
    """PASS when the engine counted no kernel compile in any measured run, FAIL when it counted
    one, UNKNOWN when it does not count them; with the warm-up's compiles (after start-up) beside."""
    rows = data.get("step_checks") or []
    known = [row for row in rows if row["kernel_compiles"] is not None]
    failed = [row for row in known if row["kernel_compiles"] > 0]
    warmup = {
        str(engine["token_budget"]): engine.get("kernel_compiles_warmup")
        for engine in data.get("engines", [])
    }
    during = sum(row["kernel_compiles"] for row in known)
    warm_total = sum(n for n in warmup.values() if n)
    if failed:
        status = "FAIL"
        names = ", ".join(f"{row['run']} ({row['kernel_compiles']})" for row in failed)
        line = f"{during} Triton kernel variants compiled during measured runs: {names}"
    elif not rows:
        status, line = "UNKNOWN", "no measured run"
    elif len(known) < len(rows):
        status = "UNKNOWN"
        line = "the engine does not report kernel_compiles (EngineStats has no such field)"
    else:
        status, line = "PASS", f"none compiled during {len(rows)} measured runs"
    if status != "UNKNOWN" or known:
        line += f"; {warm_total} compiled after start-up, during the benchmark's warm-up"
    return {
        "status": status,
        "line": line,
        "during_measured_runs": during if known else None,
        "runs_with_compiles": [row["run"] for row in failed],
        "after_startup_warmup": warmup,
    }


def _sla_met(summary: dict[str, Any]) -> str:
    """The fraction of a run's completed requests that met the SLA at each generation rate."""
    done = summary["requests_completed"]
    passed = summary.get("sla_passed")
    if not done or not passed:
        return "-"
    return " / ".join(f"{passed[g] / done:.0%}" for g in ("2", "4", "6"))


def _workload(data: dict[str, Any], workload: str) -> list[str]:
    runs = sorted(_runs(data, workload), key=lambda r: r["clients"])
    if not runs:
        return []
    first = runs[0]
    lines = [
        "",
        f"## {workload}: closed loop (mean prompt {first['mean_prompt_tokens']}, "
        f"mean generated {first['mean_new_tokens']})",
        "",
        "| clients | requests | wall s | req/s | out tok/s | TTFT p50 / p90 / p99 s | "
        "token p50 / p90 / p95 / p99 ms | effective req/s g=2 / 4 / 6 | SLA met g=2 / 4 / 6 | busy "
        "| step ms median / max | merged | client |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, e = run["summary"], run["engine_stats"]
        ttft, itl, eff = s["ttft_s"], s["token_latency_s"], s["effective_requests_per_s"]
        cut = " (cut)" if run["truncated"] else ""
        lines.append(
            f"| {run['clients']} | {s['requests_completed']}/{run['requests_planned']}{cut} | "
            f"{s['wall_s']:.1f} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.0f} | "
            f"{_slash(ttft, ('p50', 'p90', 'p99'), 3)} | "
            f"{_slash(itl, ('p50', 'p90', 'p95', 'p99'), 1, 1e3)} | "
            f"{_slash(eff, ('2', '4', '6'), 2)} | {_sla_met(s)} | {_f(e['busy_fraction'], 0, 100)}% | "
            f"{_f(e['step_ms']['median'], 2)} / {_f(e['step_ms'].get('max'), 1)} | "
            f"{_f(s['merged_delta_request_fraction'], 0, 100)}% | "
            f"{_f(s['client_overhead_fraction'], 1, 100)}% |"
        )
    for run in runs:
        if "prefix_cache_hit_tokens" in run:
            prompt_tokens = sum(r["prompt_tokens"] for r in run["requests"] if r["completed"])
            lines.append(
                f"\nprefix cache ({run['clients']} clients): {run['prefix_cache_hit_tokens']} of "
                f"{prompt_tokens} prompt tokens came from the cache"
            )
    return lines


def markdown_report(data: dict[str, Any], plot_names: list[str], method: bool = True) -> str:
    """The full report: settings, ceilings, batch-1, offline vs peer and roofline, one table per
    workload, what was skipped, and (``method``) how the figures are computed."""
    lines = _header(data) + _batch1(data) + _offline(data)
    for workload in dict.fromkeys(r["workload"] for r in _runs(data)):
        lines += _workload(data, workload)
    lines += _step_checks(data)
    if plot_names:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_names]
    if data.get("skipped") or data.get("errors"):
        lines += ["", "## Not run / errors", ""]
        lines += [f"- skipped: {item}" for item in data.get("skipped", [])]
        lines += [f"- error: {item}" for item in data.get("errors", [])]
    if method:
        lines += ["", METHOD]
    return "\n".join(lines)


def summary_table(data: dict[str, Any], json_path: Path) -> str:
    """The few figures that matter, short enough to survive a truncated log."""
    rows: list[tuple[str, str, str, str]] = []
    ceilings = data.get("ceilings") or {}
    batch1 = data.get("batch1") or {}
    floor = ceilings.get("hbm_floor_tokens_per_s")
    rate = batch1.get("decode_tokens_per_s")
    rows.append(
        (
            "batch-1 decode tok/s",
            _f(rate),
            f"HBM floor {_f(floor)}",
            f"{rate / floor:.0%}" if rate and floor else "-",
        )
    )
    peer = data.get("peer") or {}
    peer_b1 = (peer.get("generate_batch1") or {}).get("decode_tokens_per_s")
    rows.append(
        (
            "HF generate batch-1 tok/s",
            _f(peer_b1),
            "",
            f"fastgen {rate / peer_b1:.1f}x" if rate and peer_b1 else "-",
        )
    )
    for label, static in _static_peer(data):
        static_rate = static.get("decode_tokens_per_s")
        rows.append(
            (
                label.replace("`", "") + " batch-1 tok/s",
                _f(static_rate),
                f"warm-up {_f(static.get('warmup_s'))} s",
                f"fastgen {rate / static_rate:.2f}x" if rate and static_rate else "-",
            )
        )
    offline = _runs(data, offline=True)
    peer_cb = (peer.get("continuous_batching") or {}).get("summary") or {}
    for run in offline:
        s = run["summary"]
        peer_rate = peer_cb.get("output_tokens_per_s")
        budget = run.get("token_budget", data["args"]["token_budget"])
        rows.append(
            (
                f"offline {run['workload']} out tok/s ({s['requests_completed']} req, budget {budget})",
                f"{s['output_tokens_per_s']:.0f}",
                f"HF CB {_f(peer_rate, 0)} ({peer_cb.get('requests_completed', 0)} req)",
                f"{s['output_tokens_per_s'] / peer_rate:.1f}x" if peer_rate else "-",
            )
        )
        bound = run.get("roofline") or (data.get("offline_roofline") if run is offline[0] else None) or {}
        if "roofline_s" in bound:
            rows.append(
                (
                    f"offline wall s (budget {budget})",
                    f"{s['wall_s']:.1f}",
                    f"roofline {bound['roofline_s']:.1f} (+KV {bound['roofline_with_kv_s']:.1f})",
                    f"{bound['measured_over_roofline']:.2f}x "
                    f"({bound['measured_over_roofline_with_kv']:.2f}x)",
                )
            )
    if not offline and peer_cb:
        rows.append(("HF CB out tok/s", _f(peer_cb.get("output_tokens_per_s"), 0), "", ""))
    for workload in dict.fromkeys(r["workload"] for r in _runs(data)):
        runs = _runs(data, workload)
        best = max(runs, key=lambda r: r["summary"]["effective_requests_per_s"]["4"])
        top = max(runs, key=lambda r: r["summary"]["output_tokens_per_s"])
        cut = sum(r["truncated"] for r in runs)
        rows.append(
            (
                f"{workload}: clients run",
                ",".join(str(r["clients"]) for r in sorted(runs, key=lambda r: r["clients"])),
                f"{cut} cut" if cut else "",
                "",
            )
        )
        rows.append(
            (
                f"{workload}: best effective g=4 req/s",
                f"{best['summary']['effective_requests_per_s']['4']:.2f}",
                f"at {best['clients']} clients",
                f"max {top['summary']['output_tokens_per_s']:.0f} out tok/s at {top['clients']}",
            )
        )
    checks = data.get("step_checks") or []
    if checks:
        stalled = [row for row in checks if row["stall"]]
        worst = max(checks, key=lambda row: row["max_over_median"] or 0)
        rows.append(
            (
                "runs with a step > 3x their median",
                f"{len(stalled)} of {len(checks)}",
                f"worst {worst['run']}: max {_f(worst['max_ms'], 1)} ms",
                f"{_f(worst['max_over_median'], 1)}x median",
            )
        )
        verdict = data.get("kernel_compiles") or compile_verdict(data)
        warm = verdict["after_startup_warmup"]
        rows.append(
            (
                "kernels compiled in measured runs",
                _f(verdict["during_measured_runs"], 0)
                if verdict["during_measured_runs"] is not None
                else "?",
                "after start-up (warm-up): "
                + ", ".join(f"{'?' if n is None else n} at budget {b}" for b, n in warm.items()),
                verdict["status"],
            )
        )
    skipped, errors = data.get("skipped", []), data.get("errors", [])
    first_problem = (skipped + errors + [""])[0][:90].replace("|", "/").replace("\n", " ")
    rows.append(("skipped / errors", f"{len(skipped)} / {len(errors)}", first_problem, ""))
    lines = [
        "",
        f"## Summary ({data['device']}, {data['model']['shape']}; total {data.get('total_s', 0):.0f} s)",
        f"full results: {json_path}",
        "",
        "| figure | value | reference | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    # re-render a (possibly partial) result: python benchmarks/report.py RESULT.json
    import json
    import sys

    source = Path(sys.argv[1])
    result = json.loads(source.read_text())
    print(markdown_report(result, []))
    print(summary_table(result, source))
