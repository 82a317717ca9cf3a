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
- Engine busy: the sum of the engine's step times (schedule + execute + commit, from its step
  listener) / wall time; client overhead: the driver's own bookkeeping per delta / wall time.
- Peer: HF transformers, same config, random weights, same requests (a subset), in a child process
  before fastgen starts: `generate` at batch 1 and continuous batching (the manager that
  `generate_batch` drives), all requests at once, per-token timestamps from transformers.
"""


def _f(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


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
    if peer:
        rate = peer["decode_tokens_per_s"]
        ratio = f"{rate / floor:.0%}" if rate and floor else "-"
        lines.append(
            f"| HF `generate` | {peer['new_tokens']} | {_f(rate)} | {_f(peer['ttft_s'], 1, 1e3)} | {ratio} |"
        )
    return lines


def _run_row(label: str, s: dict[str, Any], planned: int | str, truncated: bool) -> str:
    ttft, itl = s["ttft_s"], s["token_latency_s"]
    cut = " (cut)" if truncated else ""
    return (
        f"| {label} | {s['requests_completed']}/{planned}{cut} | {s['wall_s']:.1f} | "
        f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.0f} | {s['total_tokens_per_s']:.0f} | "
        f"{_slash(ttft, ('p50', 'p99'), 3)} | {_slash(itl, ('p50', 'p99'), 1, 1e3)} |"
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
        "| engine | requests | wall s | req/s | out tok/s | total tok/s | TTFT p50 / p99 s "
        "| token p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(_run_row("fastgen", run["summary"], run["requests_planned"], run["truncated"]))
    if peer:
        lines.append(
            _run_row(
                "HF continuous batching",
                peer["summary"],
                data["peer"]["requests_submitted"],
                peer["truncated"],
            )
        )
    if runs and peer and peer["summary"]["output_tokens_per_s"]:
        ratio = runs[0]["summary"]["output_tokens_per_s"] / peer["summary"]["output_tokens_per_s"]
        lines += ["", f"fastgen / HF output tokens/s: **{ratio:.1f}x** (the peer ran a subset)"]
    bound = data.get("offline_roofline") or {}
    if "roofline_s" in bound:
        lines += [
            "",
            f"Roofline: prefill {bound['prefill_flops'] / 1e15:.2f} PFLOP -> {bound['prefill_s']:.2f} s; "
            f"{bound['decode_steps']} decode steps (C = {bound['concurrency']}) "
            f"-> {bound['decode_s']:.2f} s; roofline **{bound['roofline_s']:.2f} s**, "
            f"measured {bound['measured_s']:.2f} s = **{bound['measured_over_roofline']:.2f}x**. "
            f"With the KV reads ({bound['kv_read_s']:.2f} s): {bound['roofline_with_kv_s']:.2f} s, "
            f"measured = {bound['measured_over_roofline_with_kv']:.2f}x.",
        ]
    elif bound.get("note"):
        lines += ["", f"Roofline: {bound['note']}"]
    return lines


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
        "token p50 / p90 / p95 / p99 ms | effective req/s g=2 / 4 / 6 | busy | step ms | merged | client |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{_slash(eff, ('2', '4', '6'), 2)} | {_f(e['busy_fraction'], 0, 100)}% | "
            f"{_f(e['step_ms']['median'], 2)} | {_f(s['merged_delta_request_fraction'], 0, 100)}% | "
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
    offline = _runs(data, offline=True)
    peer_cb = (peer.get("continuous_batching") or {}).get("summary") or {}
    if offline:
        s = offline[0]["summary"]
        peer_rate = peer_cb.get("output_tokens_per_s")
        rows.append(
            (
                f"offline {offline[0]['workload']} out tok/s ({s['requests_completed']} req)",
                f"{s['output_tokens_per_s']:.0f}",
                f"HF CB {_f(peer_rate, 0)} ({peer_cb.get('requests_completed', 0)} req)",
                f"{s['output_tokens_per_s'] / peer_rate:.1f}x" if peer_rate else "-",
            )
        )
        bound = data.get("offline_roofline") or {}
        if "roofline_s" in bound:
            rows.append(
                (
                    "offline wall s",
                    f"{s['wall_s']:.1f}",
                    f"roofline {bound['roofline_s']:.1f} (+KV {bound['roofline_with_kv_s']:.1f})",
                    f"{bound['measured_over_roofline']:.2f}x "
                    f"({bound['measured_over_roofline_with_kv']:.2f}x)",
                )
            )
    elif peer_cb:
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
