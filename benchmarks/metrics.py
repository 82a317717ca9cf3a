"""Serving metrics from per-request timestamps: TTFT, inter-token gaps, percentiles, and FastGen's
effective throughput.

Token times. A client sees outputs as deltas; a delta may carry several tokens when the engine
produced them while the client was busy. Each token of a k-token delta that arrives at t_j gets
the time ``t_{j-1} + (t_j - t_{j-1}) * i / k`` (i = 1..k, t_{j-1} the previous delta's arrival;
for the first delta t_{j-1} = t_j): the gap is split evenly, so the gaps of a request always sum
to its decode time, and a merged delta shows as k equal gaps rather than one long and k-1 zero
ones. How often deltas merge is reported beside (``max_tokens_per_delta``).

SLA (DeepSpeed-FastGen): a request passes at g tokens/s when its TTFT <= prompt_tokens / 512 s and
the exponential moving average of its inter-token gaps (span 16: alpha = 2 / 17, bias-corrected
like pandas' ``ewm(span=16).mean()``) stays below 1 / g s at every token. A request with one
generated token has no gaps and passes on its TTFT alone. Effective throughput = passing requests /
wall time of the run.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
SLA_TOKENS_PER_S = (2, 4, 6)
SLA_PROMPT_TOKENS_PER_S = 512.0
EMA_SPAN = 16
STALL_FACTOR = 3.0  # a run stalls when a step takes more than this many times the run's median step


def token_times(arrivals_s: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Per-token times from delta arrival times and token counts (split evenly; module docstring)."""
    times: list[float] = []
    previous = arrivals_s[0] if arrivals_s else 0.0
    for arrival, count in zip(arrivals_s, counts, strict=True):
        step = (arrival - previous) / count
        times.extend(previous + step * i for i in range(1, count + 1))
        previous = arrival
    return times


def gaps(times: Sequence[float]) -> list[float]:
    """Differences between consecutive times."""
    return [b - a for a, b in itertools.pairwise(times)]


def ema(values: Sequence[float], span: int = EMA_SPAN) -> list[float]:
    """Bias-corrected exponential moving average (pandas ``ewm(span).mean()``, ``adjust=True``):
    ``sum_i (1 - alpha)^i x_{t-i} / sum_i (1 - alpha)^i`` with alpha = 2 / (span + 1)."""
    keep = 1.0 - 2.0 / (span + 1)
    out = []
    weighted = norm = 0.0
    for value in values:
        weighted = value + keep * weighted
        norm = 1.0 + keep * norm
        out.append(weighted / norm)
    return out


def passes_sla(
    prompt_tokens: int,
    ttft_s: float,
    gaps_s: Sequence[float],
    tokens_per_s: float,
    *,
    prompt_tokens_per_s: float = SLA_PROMPT_TOKENS_PER_S,
    span: int = EMA_SPAN,
) -> bool:
    """FastGen's per-request SLA at ``tokens_per_s`` (module docstring)."""
    if ttft_s > prompt_tokens / prompt_tokens_per_s:
        return False
    limit = 1.0 / tokens_per_s
    return all(value < limit for value in ema(gaps_s, span))


def percentiles(values: Iterable[float], points: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """``{"p50": ..., "mean": ...}`` (numpy's linear interpolation); None for no values."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return {**{f"p{p}": None for p in points}, "mean": None}
    result: dict[str, float | None] = {f"p{p}": float(np.percentile(array, p)) for p in points}
    result["mean"] = float(array.mean())
    return result


@dataclass
class RequestRecord:
    """What one request looked like from the client (times in seconds from the run's start)."""

    index: int
    prompt_tokens: int
    max_new_tokens: int
    submit_s: float
    arrivals_s: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    end_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    client_overhead_s: float = 0.0

    @property
    def output_tokens(self) -> int:
        return sum(self.counts)

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason is not None and self.finish_reason != "abort"

    def summary(self, sla_tokens_per_s: Sequence[float] = SLA_TOKENS_PER_S) -> dict[str, Any]:
        """The JSON record: TTFT, end-to-end latency, every inter-token gap (ms), SLA verdicts."""
        times = token_times(self.arrivals_s, self.counts)
        gaps_s = gaps(times)
        ttft_s = times[0] - self.submit_s if times else None
        e2e_s = self.end_s - self.submit_s if self.end_s is not None else None
        judged = self.completed and ttft_s is not None
        sla = {
            str(g): bool(judged and passes_sla(self.prompt_tokens, ttft_s, gaps_s, g))
            for g in sla_tokens_per_s
        }
        return {
            "index": self.index,
            "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "output_tokens": self.output_tokens,
            "completed": self.completed,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "submit_s": round(self.submit_s, 6),
            "ttft_s": ttft_s,
            "e2e_s": e2e_s,
            "num_deltas": len(self.counts),
            "max_tokens_per_delta": max(self.counts, default=0),
            "client_overhead_s": self.client_overhead_s,
            "sla_pass": sla,
            "gaps_ms": [round(g * 1000.0, 4) for g in gaps_s],
        }


def summarize_run(
    requests: Sequence[dict[str, Any]],
    wall_s: float,
    sla_tokens_per_s: Sequence[float] = SLA_TOKENS_PER_S,
) -> dict[str, Any]:
    """Aggregates of a run from its request summaries (`RequestRecord.summary`)."""
    done = [r for r in requests if r["completed"]]
    output_tokens = sum(r["output_tokens"] for r in done)
    prompt_tokens = sum(r["prompt_tokens"] for r in done)
    all_gaps_s = [g / 1000.0 for r in done for g in r["gaps_ms"]]
    wall = max(wall_s, 1e-9)
    passed = {str(g): sum(r["sla_pass"][str(g)] for r in done) for g in sla_tokens_per_s}
    deltas = sum(r["num_deltas"] for r in done)
    overhead = sum(r["client_overhead_s"] for r in requests)
    return {
        "requests_completed": len(done),
        "requests_failed": sum(1 for r in requests if r["error"] is not None),
        "wall_s": wall_s,
        "requests_per_s": len(done) / wall,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / wall,
        "ttft_s": percentiles(r["ttft_s"] for r in done if r["ttft_s"] is not None),
        "token_latency_s": percentiles(all_gaps_s),
        "e2e_s": percentiles(r["e2e_s"] for r in done if r["e2e_s"] is not None),
        "sla_passed": passed,
        "effective_requests_per_s": {g: n / wall for g, n in passed.items()},
        "deltas": deltas,
        "merged_delta_request_fraction": (
            sum(1 for r in done if r["max_tokens_per_delta"] > 1) / len(done) if done else 0.0
        ),
        "client_overhead_s": overhead,
        "client_overhead_fraction": overhead / wall,
    }


def step_stats(
    seconds: Sequence[float],
    tokens: Sequence[int],
    factor: float = STALL_FACTOR,
    slowest: int = 5,
    device_seconds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Step times of one run in ms: median, mean, p99, max and max / median; how many steps took
    more than ``factor`` x the median (any is a stall); the ``slowest`` steps with their index in
    the run and their token count (a long step of many prompt tokens is not the same finding as a
    long step of a few decodes); and each step against the median of the steps of its size, the
    largest such ratio and how many exceed ``factor``. ``tokens[i]`` belongs to ``seconds[i]``.
    ``device_seconds[i]``, when the runner measured it (> 0), is step i's own span on the device:
    the slowest steps carry it, so a step slow on the device tells itself from one whose result
    reached the engine late (a busy event loop)."""
    if len(tokens) != len(seconds):
        raise ValueError(f"{len(seconds)} step times but {len(tokens)} token counts")
    if device_seconds is not None and len(device_seconds) != len(seconds):
        raise ValueError(f"{len(seconds)} step times but {len(device_seconds)} device times")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    median = float(np.median(ms)) if ms.size else None
    order = np.argsort(ms)[::-1][:slowest]
    slow = int((ms > factor * median).sum()) if median is not None else 0
    by_size = _over_size_medians(ms, np.asarray(tokens, dtype=np.int64))

    def device_ms(index: int) -> float | None:
        measured = device_seconds is not None and device_seconds[index] > 0
        return round(float(device_seconds[index]) * 1000.0, 3) if measured else None

    return {
        "count": int(ms.size),
        "median": median,
        "mean": float(ms.mean()) if ms.size else None,
        "p99": float(np.percentile(ms, 99)) if ms.size else None,
        "max": float(ms.max()) if ms.size else None,
        "max_over_median": float(ms.max() / median) if median else None,
        "max_step_tokens": int(tokens[order[0]]) if ms.size else None,
        "stall_factor": factor,
        "slow_steps": slow,
        "stall": slow > 0,
        "slowest": [
            {"index": int(i), "ms": round(float(ms[i]), 3), "tokens": int(tokens[i]),
             "device_ms": device_ms(int(i))}
            for i in order
        ],
        "max_step_device_ms": device_ms(int(order[0])) if ms.size else None,
        # against the steps of its size only: a step of many prompt tokens beside decode-only ones
        "max_over_size_median": float(by_size.max()) if by_size.size else None,
        "size_slow_steps": int((by_size > factor).sum()),
    }


SIZE_CLASS_MIN_STEPS = 5  # steps a token-count class needs for its median to judge its members


def _over_size_medians(ms: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Each step's time over the median of the steps of its size class (token counts within a
    power of two: 1, 2-3, 4-7, ...), for the classes of at least `SIZE_CLASS_MIN_STEPS` steps."""
    classes = np.where(tokens > 0, np.floor(np.log2(np.maximum(tokens, 1))), -1).astype(np.int64)
    ratios = []
    for size_class in np.unique(classes):
        members = ms[classes == size_class]
        if members.size >= SIZE_CLASS_MIN_STEPS:
            ratios.append(members / np.median(members))
    return np.concatenate(ratios) if ratios else np.zeros(0)


class GcPauses:
    """Pauses of Python's cyclic garbage collector in this process (``gc.callbacks``), for a run
    to report beside its step times: a full collection of a large heap holds the GIL for tens of
    milliseconds, a slow step no kernel explains. Collections on any thread are counted."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds), in order
        self._started: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))
            self._started = None

    def mark(self) -> int:
        """A position to summarize from."""
        return len(self.pauses)

    def summary(self, since: int = 0) -> dict[str, Any]:
        """Collections since ``since``: how many, how many full (generation 2), the longest pause
        and the full ones' total, in ms."""
        pauses = self.pauses[since:]
        full = [seconds for generation, seconds in pauses if generation == 2]
        return {
            "collections": len(pauses),
            "full_collections": len(full),
            "max_pause_ms": max((seconds for _, seconds in pauses), default=0.0) * 1000.0,
            "full_pause_ms_sum": sum(full) * 1000.0,
        }

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
