"""PNG plots of a serving benchmark result (the JSON of `benchmarks/serving.py`).

python benchmarks/plots.py benchmarks/results/serving-h100-....json   # redraws the plots beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _closed_loop(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for run in data.get("runs", []):
        if not run.get("offline"):
            by_workload.setdefault(run["workload"], []).append(run)
    return {name: sorted(runs, key=lambda r: r["clients"]) for name, runs in by_workload.items()}


def _budget(run: dict[str, Any]) -> str:
    return f" (budget {run['token_budget']})" if "token_budget" in run else ""


def plot_latency_throughput(data: dict[str, Any], path: Path) -> Path:
    """Token latency (P50, P90) against output tokens/s, one point per client count, per workload;
    the offline runs and the HF peer as single points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (name, runs) in enumerate(_closed_loop(data).items()):
        x = [r["summary"]["output_tokens_per_s"] for r in runs]
        for pct, style in (("p50", "-o"), ("p90", "--s")):
            y = [(r["summary"]["token_latency_s"][pct] or 0) * 1000 for r in runs]
            ax.plot(x, y, style, color=f"C{index}", label=f"fastgen {name} {pct.upper()}")
            if pct == "p50":
                for xi, yi, r in zip(x, y, runs):
                    ax.annotate(
                        str(r["clients"]), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7
                    )
    points = [
        (f"fastgen offline {r['workload']}" + _budget(r), r["summary"])
        for r in data.get("runs", [])
        if r.get("offline")
    ]
    peer = (data.get("peer") or {}).get("continuous_batching")
    if peer:
        points.append(
            (f"HF continuous batching ({peer['summary']['requests_completed']} req)", peer["summary"])
        )
    for label, summary in points:
        for pct, marker in (("p50", "^"), ("p90", "v")):
            value = summary["token_latency_s"][pct]
            if value is not None:
                ax.scatter(
                    [summary["output_tokens_per_s"]],
                    [value * 1000],
                    marker=marker,
                    label=f"{label} {pct.upper()}",
                )
    ax.set_xscale("log")
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("token latency (ms)")
    ax.set_yscale("log")
    ax.set_title(
        f"Throughput vs token latency ({data['device']}, {data['model']['shape']}); labels: clients",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_effective_throughput(data: dict[str, Any], path: Path) -> Path:
    """Effective throughput (req/s passing the SLA at g = 2, 4, 6 tokens/s) against clients, per workload."""
    plt = _pyplot()
    workloads = _closed_loop(data)
    fig, axes = plt.subplots(
        1, max(1, len(workloads)), figsize=(4.5 * max(1, len(workloads)), 4), squeeze=False
    )
    for ax, (name, runs) in zip(axes[0], workloads.items()):
        clients = [r["clients"] for r in runs]
        for g in ("2", "4", "6"):
            ax.plot(
                clients,
                [r["summary"]["effective_requests_per_s"][g] for r in runs],
                "-o",
                label=f"SLA {g} tok/s",
            )
        ax.plot(
            clients, [r["summary"]["requests_per_s"] for r in runs], ":", color="gray", label="all requests"
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("clients")
        ax.set_ylabel("effective throughput (req/s)")
        ax.set_title(f"fastgen {name}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Effective throughput ({data['device']}, {data['model']['shape']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(data: dict[str, Any], stem: Path) -> list[Path]:
    """Both plots, as ``<stem>-latency.png`` and ``<stem>-effective.png``; none without runs."""
    if not data.get("runs") and not (data.get("peer") or {}).get("continuous_batching"):
        return []
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [plot_latency_throughput(data, stem.with_name(stem.name + "-latency.png"))]
    if _closed_loop(data):
        paths.append(plot_effective_throughput(data, stem.with_name(stem.name + "-effective.png")))
    return paths


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for written in plot_all(json.loads(source.read_text()), source.with_suffix("")):
        print(written)
