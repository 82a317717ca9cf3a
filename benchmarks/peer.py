"""The peer: HF transformers on the same model shape and the same requests as fastgen.

Run by `benchmarks/serving.py` in a child process (so its GPU memory is gone before fastgen sizes
its KV cache, and a crash or a hang can't take the fastgen figures with it):

- ``generate`` at batch 1 (greedy, no EOS), timed per token with a streamer: eager (the default
  dynamic cache), then with ``cache_implementation="static"``, with which ``generate`` compiles
  the forward (torch.compile, on CUDA; on a CPU it runs the static cache uncompiled), warmed with
  one full ``generate`` of the same shape first so that the compile stays out of the timing;
- continuous batching: the `ContinuousBatchingManager` that ``model.generate_batch`` drives,
  used directly so that each request keeps its own ``max_new_tokens``; every request is submitted
  at once (offline), with per-token timestamps (``record_timestamps``), after the manager's own
  warm-up.

    python benchmarks/peer.py --model-dir DIR --requests REQUESTS.json --out PEER.json [--device cuda]

The result JSON is rewritten after each part, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from metrics import RequestRecord, summarize_run


def _write(path: Path, result: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a kill mid-write leaves the previous version."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(path)


def build_model(model_dir: str, device: str, dtype_name: str) -> tuple[Any, float]:
    """The HF model of ``model_dir``'s config with random weights, built on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # every request runs to its max_new_tokens
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, time.perf_counter() - started


def generate_batch1(
    model: Any, prompt: list[int], new_tokens: int, cache_implementation: str | None = None
) -> dict[str, Any]:
    """Greedy ``generate`` of one prompt; TTFT and decode tokens/s from per-token times.

    Warm-up: a short ``generate`` for the default cache; for a static cache a full one of the same
    shape (its cache length and compiled graphs are those of the timed call)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class TokenTimer(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value: Any) -> None:
            value.cpu()  # the token is on the host: a sync point
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    device = model.device
    input_ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(input_ids)

    def run(tokens: int) -> tuple[float, list[float]]:
        options: dict[str, Any] = (
            {"cache_implementation": cache_implementation} if cache_implementation else {}
        )
        config = GenerationConfig(
            max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **options
        )
        timer = TokenTimer()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, generation_config=config, streamer=timer)
        return started, timer.times

    graphs_before = _dynamo_graphs()
    warm_started = time.perf_counter()
    run(new_tokens if cache_implementation == "static" else min(8, new_tokens))
    warmup_s = time.perf_counter() - warm_started
    graphs_compiled = _dynamo_graphs() - graphs_before
    started, times = run(new_tokens)
    recompiled = _dynamo_graphs() - graphs_before - graphs_compiled
    decode_s = times[-1] - times[0] if len(times) > 1 else None
    return {
        "cache_implementation": cache_implementation or "dynamic",
        # generate compiles the forward of a static cache on an accelerator (transformers' auto-compile)
        "compiled": graphs_compiled > 0 or getattr(model, "_compiled_call", None) is not None,
        "dynamo_graphs_compiled_in_warmup": graphs_compiled,
        "dynamo_graphs_compiled_while_timed": recompiled,  # should be 0: the warm-up had the same shape
        "warmup_s": warmup_s,
        "prompt_tokens": len(prompt),
        "new_tokens": len(times),
        "ttft_s": times[0] - started if times else None,
        "decode_tokens_per_s": (len(times) - 1) / decode_s if decode_s else None,
        "wall_s": times[-1] - started if times else None,
    }


def _dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _cb_config(options: dict[str, Any]) -> Any:
    """A `ContinuousBatchingConfig` with the options this transformers version knows (or None)."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return None
    from transformers import ContinuousBatchingConfig

    known = inspect.signature(ContinuousBatchingConfig).parameters
    return ContinuousBatchingConfig(**{k: v for k, v in options.items() if k in known})


def continuous_batching(
    model: Any, requests: list[dict[str, Any]], deadline: float, cb_options: dict[str, Any]
) -> dict[str, Any]:
    """All ``requests`` at once through HF continuous batching; per-request records and aggregates."""
    from transformers import GenerationConfig

    max_new = max(r["max_new_tokens"] for r in requests)
    generation_config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    kwargs: dict[str, Any] = {"generation_config": generation_config, "block": True, "timeout": 10}
    cb_config = _cb_config(cb_options)
    if cb_config is not None:
        kwargs["continuous_batching_config"] = cb_config
    accepted = inspect.signature(model.continuous_batching_context_manager).parameters
    if "workload_hints" in accepted:
        with contextlib.suppress(ImportError, TypeError):
            from transformers.generation.continuous_batching.utils import WorkloadHints

            kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(len(r["prompt"]) for r in requests),
                max_generated_length=max_new,
                num_requests=len(requests),
            )
    setup_started = time.perf_counter()
    records: dict[str, RequestRecord] = {}
    truncated = False
    with model.continuous_batching_context_manager(**kwargs) as manager:
        setup_s = time.perf_counter() - setup_started  # cache sizing and warm-up, not timed below
        run_start = time.perf_counter()
        for request in requests:
            request_id = f"r{request['index']}"
            records[request_id] = RequestRecord(
                index=request["index"],
                prompt_tokens=len(request["prompt"]),
                max_new_tokens=request["max_new_tokens"],
                submit_s=time.perf_counter() - run_start,
            )
            manager.add_request(
                request["prompt"],
                request_id=request_id,
                max_new_tokens=request["max_new_tokens"],
                record_timestamps=True,
                eos_token_id=-1,
            )
        finished = 0
        while finished < len(requests):
            if time.perf_counter() > deadline:
                truncated = True
                break
            output = manager.get_result(timeout=1)
            if output is None:
                if not manager.is_running():
                    break
                continue
            record = records.get(output.request_id)
            if record is None or not output.is_finished():
                continue
            finished += 1
            stamps = output.timestamps or []
            record.arrivals_s = [t - run_start for t in stamps]
            record.counts = [1] * len(stamps)
            record.end_s = record.arrivals_s[-1] if stamps else time.perf_counter() - run_start
            record.error = output.error
            record.finish_reason = "length" if output.error is None else None
        wall_s = max((r.end_s for r in records.values() if r.end_s is not None), default=0.0)
    summaries = [r.summary() for r in records.values()]
    return {
        "engine": "hf-transformers",
        "mode": "continuous batching (ContinuousBatchingManager, as generate_batch), all requests at once",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "setup_s": setup_s,
        "truncated": truncated,
        "summary": summarize_run(summaries, wall_s),
        "requests": summaries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--requests", required=True, help="JSON: {batch1: {...}, requests: [...]}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--time-limit-s", type=float, default=None)
    parser.add_argument("--num-blocks", type=int, default=None, help="continuous batching cache blocks")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--skip-static", action="store_true", help="no batch-1 run with a static cache")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.time_limit_s if args.time_limit_s else float("inf")
    out = Path(args.out)
    work = json.loads(Path(args.requests).read_text())
    import torch
    import transformers

    result: dict[str, Any] = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "errors": [],
    }
    model, result["build_s"] = build_model(args.model_dir, args.device, args.dtype)
    result["params"] = sum(p.numel() for p in model.parameters())
    _write(out, result)
    parts = [
        ("generate_batch1", lambda: generate_batch1(model, **work["batch1"])),
        (
            "generate_batch1_static",
            lambda: generate_batch1(model, **work["batch1"], cache_implementation="static"),
        ),
    ]
    if work["requests"]:  # none: no continuous batching run
        cb_options = {"num_blocks": args.num_blocks, "max_batch_tokens": args.max_batch_tokens}
        parts.append(
            (
                "continuous_batching",
                lambda: continuous_batching(model, work["requests"], deadline, cb_options),
            )
        )
    if args.skip_static:
        parts = [part for part in parts if part[0] != "generate_batch1_static"]
    for name, part in parts:
        if time.perf_counter() > deadline:
            result["errors"].append(f"{name}: skipped, the time limit was spent")
            continue
        try:
            result[name] = part()
        except Exception as exc:  # report and go on: the peer's failure must not hide the rest
            result["errors"].append(f"{name}: {exc!r}")
            traceback.print_exc()
        _write(out, result)
    print(f"peer done in {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
