"""FlashInfer as a kernel-level peer: paged decode and paged prefill attention on the same data as
fastgen's Triton kernel (`fastgen.kernels.attention_triton.paged_attention_triton`), GPU only.

    python benchmarks/flashinfer_peer.py [--out benchmarks/results] [--compile-only]
    python benchmarks/flashinfer_peer.py --smoke      # CPU: checks the page-table conversion only

Cases (those of `benchmarks/kernel_timings.py`, bf16, head_dim 128, blocks of 16 tokens):
decode of 64 sequences x 2048 context and a 4096-token causal prefill, each with the Llama-2-7B
(32 query / 32 KV heads) and the Llama-3-8B (32 / 8) head layouts, and a Dynamic SplitFuse step
(256 decodes at context 1024 + a 512-token chunk after 1536 cached tokens, Llama-3-8B).

Same data: fastgen's cache is ``[num_blocks, block_size, num_kv_heads, head_dim]`` for keys and for
values, which is FlashInfer's ``NHD`` paged layout with ``page_size = block_size``; only the page
table changes form (fastgen's padded block table per sequence -> FlashInfer's CSR ``indptr`` /
``indices`` / ``last_page_len``, `flashinfer_page_table`). Before timing, each FlashInfer variant's
output is compared with fastgen's on the whole batch (relative error of the norm < 1e-2, bf16);
a variant that disagrees is reported, not timed.

FlashInfer variants: decode with CUDA cores and with tensor cores
(``BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=...)``); prefill and the mixed step with
``BatchPrefillWithPagedKVCacheWrapper`` at ``backend="auto"`` (FA3 on Hopper) and ``"fa2"``. Each
variant's first ``plan`` + ``run`` JIT-compiles its kernels with the machine's nvcc (cached under
``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer``, default here /tmp/fastgen-flashinfer): that
call is timed apart (``first_call_s``) and kept out of the kernel times. ``--compile-only`` does
just those first calls on small batches (to build the cache ahead of a timed run). Kernel times
are medians of ``triton.testing.do_bench`` (L2 flushed before each call), as in kernel_timings.py;
``plan`` (host work, once per batch and shared by every layer) is timed apart.

Writes a table to stdout and JSON + markdown to ``--out`` (flashinfer-<device>-<date>.*). Exits
cleanly, with a message that says what is missing, without CUDA or without flashinfer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HEAD_DIM = 128
BLOCK_SIZE = 16
HEAD_LAYOUTS = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}  # query heads, KV heads
MAX_RELATIVE_ERROR = 1e-2  # bf16 outputs of two correct kernels differ by ~1e-3
WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class Case:
    """One attention launch: ``specs`` = (query tokens, context tokens) per sequence."""

    name: str
    kind: str  # "decode": one query token per sequence; "prefill": any (causal)
    model: str
    specs: tuple[tuple[int, int], ...]

    @property
    def heads(self) -> tuple[int, int]:
        return HEAD_LAYOUTS[self.model]

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values read once (bf16)."""
        return sum(c for _, c in self.specs) * self.heads[1] * HEAD_DIM * 2 * 2

    @property
    def flops(self) -> int:
        """QK^T and PV over the (causal) query-key pairs: 4 x heads x head_dim per pair."""
        pairs = 0
        for query, context in self.specs:
            cached = context - query
            pairs += query * cached + query * (query + 1) // 2
        return 4 * self.heads[0] * HEAD_DIM * pairs


def cases(smoke: bool = False) -> list[Case]:
    """The timed cases, or (``smoke``) small ones of the same kinds for a CPU check."""
    if smoke:
        decode, prefill = ((1, 40),) * 3 + ((1, 17),), ((24, 24), (5, 37))
        mixed = ((1, 20),) * 3 + ((9, 33),)
        names = ("decode {} smoke", "prefill {} smoke", "mixed step {} smoke")
    else:
        decode, prefill = ((1, 2048),) * 64, ((4096, 4096),)
        mixed = ((1, 1024),) * 256 + ((512, 2048),)
        names = ("decode {} 64x2048", "prefill 4096 causal {}", "mixed step 256 decodes + 512 chunk ({})")
    found = []
    for model in HEAD_LAYOUTS:
        found.append(Case(names[0].format(model), "decode", model, decode))
        found.append(Case(names[1].format(model), "prefill", model, prefill))
    found.append(Case(names[2].format("llama3-8b"), "prefill", "llama3-8b", mixed))
    return found


# -- data: fastgen's paged batch and FlashInfer's page table ---------------------------------------


def paged_batch(case: Case, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ragged batch in fastgen's layout with shuffled block tables (as kernel_timings.paged_batch)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    num_heads, num_kv_heads = case.heads
    blocks = [math.ceil(c / BLOCK_SIZE) for _, c in case.specs]
    shape = (sum(blocks), BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    value_cache = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    order = torch.randperm(sum(blocks), generator=generator).to(torch.int32)
    block_tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks):
        block_tables[seq, :count] = order[used : used + count]
        used += count
    lens = torch.tensor([q for q, _ in case.specs])
    tokens = int(lens.sum())
    query = torch.randn(tokens, num_heads, HEAD_DIM, generator=generator, dtype=torch.float32)
    return {
        "query": query.to(device, dtype),
        "key_cache": key_cache,
        "value_cache": value_cache,
        "query_start": torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(device, torch.int32),
        "context_lens": torch.tensor([c for _, c in case.specs], dtype=torch.int32, device=device),
        "block_tables": block_tables.to(device),
    }


def flashinfer_page_table(
    block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastgen's padded block tables as FlashInfer's CSR page table: ``indptr`` [num_seqs + 1],
    ``indices`` (each sequence's pages in order, concatenated) and ``last_page_len`` (tokens in
    each sequence's last page, 1..page_size)."""
    pages = (context_lens + page_size - 1) // page_size
    indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)]).to(torch.int32)
    columns = torch.arange(block_tables.shape[1], device=block_tables.device)
    indices = block_tables[columns[None, :] < pages[:, None]].to(torch.int32)  # row-major: in order
    last_page_len = (context_lens - (pages - 1) * page_size).to(torch.int32)
    return indptr, indices, last_page_len


def csr_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention read through a FlashInfer-style CSR page table (NHD pages), in float32:
    the queries of a sequence are its last tokens (FlashInfer's bottom-right causal alignment)."""
    page_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    starts, pointers = query_start.tolist(), indptr.tolist()
    for seq, last in enumerate(last_page_len.tolist()):
        pages = indices[pointers[seq] : pointers[seq + 1]].long()
        context = (len(pages) - 1) * page_size + last
        keys = key_cache[pages].reshape(-1, num_kv_heads, HEAD_DIM)[:context].float()
        values = value_cache[pages].reshape(-1, num_kv_heads, HEAD_DIM)[:context].float()
        q = query[starts[seq] : starts[seq + 1]].float()
        positions = torch.arange(context - len(q), context, device=query.device)
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        mask = torch.arange(context, device=query.device)[None, :] > positions[:, None]
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        out[starts[seq] : starts[seq + 1]] = torch.einsum("hqk,khd->qhd", weights, values).to(out.dtype)
    return out


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).norm() / expected.float().norm())


# -- FlashInfer --------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One FlashInfer wrapper configuration for a kind of case."""

    label: str
    kind: str
    make: Callable[[Any, torch.Tensor], Any]  # (flashinfer module, workspace) -> wrapper


VARIANTS = [
    Variant(
        "flashinfer decode (CUDA cores)",
        "decode",
        lambda fi, ws: fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=False),
    ),
    Variant(
        "flashinfer decode (tensor cores)",
        "decode",
        lambda fi, ws: fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True),
    ),
    Variant(
        "flashinfer prefill (auto)",
        "prefill",
        lambda fi, ws: fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="auto"),
    ),
    Variant(
        "flashinfer prefill (fa2)",
        "prefill",
        lambda fi, ws: fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2"),
    ),
]


def flashinfer_call(variant: Variant, wrapper: Any, case: Case, batch: dict[str, torch.Tensor]) -> Callable:
    """Plan ``wrapper`` for ``batch``; returns the timed call (``run`` into a preallocated output)."""
    num_heads, num_kv_heads = case.heads
    indptr, indices, last_page_len = flashinfer_page_table(
        batch["block_tables"], batch["context_lens"], BLOCK_SIZE
    )
    dtype = batch["query"].dtype
    scale = HEAD_DIM**-0.5
    if variant.kind == "decode":
        wrapper.plan(
            indptr, indices, last_page_len, num_heads, num_kv_heads, HEAD_DIM, BLOCK_SIZE,
            pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype, sm_scale=scale,
        )  # fmt: skip
    else:
        wrapper.plan(
            batch["query_start"], indptr, indices, last_page_len, num_heads, num_kv_heads, HEAD_DIM,
            BLOCK_SIZE, causal=True, pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype,
            sm_scale=scale,
        )  # fmt: skip
    out = torch.empty_like(batch["query"])
    cache = (batch["key_cache"], batch["value_cache"])
    return lambda: wrapper.run(batch["query"], cache, out=out)


def time_plan_ms(variant: Variant, wrapper: Any, case: Case, batch: dict[str, torch.Tensor]) -> float:
    """Median host time of ``plan`` (it copies the page table and, for some kernels, syncs)."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        flashinfer_call(variant, wrapper, case, batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


# -- the run -----------------------------------------------------------------------------------------


def gpu_run(args: argparse.Namespace) -> int:
    """Time every case (or, ``--compile-only``, just build FlashInfer's kernels); exit status 1 when
    a FlashInfer variant failed or disagreed with fastgen."""
    import flashinfer
    from kernel_timings import Bench, ceilings
    from tqdm import tqdm

    torch.manual_seed(0)
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    chosen = [case for case in cases(smoke=args.compile_only) if not args.only or case.kind in args.only]
    bench = Bench()
    if not args.compile_only:
        ceilings(bench)
    details = []
    for case in tqdm(chosen, desc="attention cases", unit="case"):
        details.append(measure_case(case, flashinfer, workspace, bench, timed=not args.compile_only))
        torch.cuda.empty_cache()
    failures = [
        f"{d['case']['name']} / {r['impl']}: {r['error']}"
        for d in details
        for r in d["flashinfer"]
        if "error" in r
    ]
    if args.compile_only:
        print(f"flashinfer kernels built or loaded for {len(chosen)} cases; failures: {failures or 'none'}")
    else:
        write_report(args.out, bench, details, failures, flashinfer.__version__)
    return 1 if failures else 0


def measure_case(
    case: Case, flashinfer: Any, workspace: torch.Tensor, bench: Any, timed: bool
) -> dict[str, Any]:
    """fastgen's kernel and each FlashInfer variant of the case's kind on one batch: outputs compared,
    then (``timed``) kernel times added to ``bench``."""
    from kernel_timings import attention_call, check_attention, median_us
    from tqdm import tqdm

    batch = paged_batch(case, "cuda", torch.bfloat16)
    # as the engine launches a mixed step: its leading decodes apart from the chunk (num_decodes)
    decodes = 0 if case.kind == "decode" else next((i for i, (q, _) in enumerate(case.specs) if q > 1), 0)
    fastgen = attention_call(batch, list(case.specs), num_decodes=decodes)
    check_attention(batch, fastgen)  # against fastgen's reference, on a few sequences
    expected = fastgen().clone()
    fastgen_us = median_us(fastgen) if timed else None
    results: list[dict[str, Any]] = []
    for variant in (v for v in VARIANTS if v.kind == case.kind):
        result: dict[str, Any] = {"impl": variant.label}
        try:
            wrapper = variant.make(flashinfer, workspace)
            started = time.perf_counter()
            out = flashinfer_call(variant, wrapper, case, batch)()
            torch.cuda.synchronize()
            result["first_call_s"] = time.perf_counter() - started  # JIT build (or cache load) + plan
            result["relative_error"] = relative_error(out, expected)
            if not result["relative_error"] < MAX_RELATIVE_ERROR:
                raise AssertionError(
                    f"output differs from fastgen's: relative error {result['relative_error']:.3g}"
                )
            if timed:
                result["plan_ms"] = time_plan_ms(variant, wrapper, case, batch)
                result["time_us"] = median_us(flashinfer_call(variant, wrapper, case, batch))
        except Exception as exc:  # report and go on: one variant must not hide the others
            traceback.print_exc()
            result["error"] = repr(exc)[:500]
        results.append(result)
        if "error" in result:
            tqdm.write(f"{case.name} / {variant.label}: {result['error']}")
        else:
            tqdm.write(
                f"{case.name} / {variant.label}: first call {result['first_call_s']:.1f} s, relative error "
                f"{result['relative_error']:.1e}" + (f", {result['time_us']:.1f} us" if timed else "")
            )
    times = [r["time_us"] for r in results if "time_us" in r]
    if fastgen_us is not None:
        bench.add(
            case.name,
            "fastgen triton",
            fastgen_us,
            case.kv_bytes,
            case.flops,
            peer_us=min(times, default=None),
        )
        for r in results:
            if "time_us" in r:
                bench.add(case.name, r["impl"], r["time_us"], case.kv_bytes, case.flops)
    return {
        "case": asdict(case),
        "fastgen_us": fastgen_us,
        "fastgen_num_decodes": decodes,
        "flashinfer": results,
        "fastgen_speed_over_best_flashinfer": min(times) / fastgen_us if times and fastgen_us else None,
    }


def write_report(
    out_dir: Path, bench: Any, details: list[dict[str, Any]], failures: list[str], version: str
) -> None:
    """The table on stdout; markdown and JSON under ``out_dir``."""
    import triton
    from kernel_timings import table

    device = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.UTC)
    command = "python benchmarks/flashinfer_peer.py " + " ".join(sys.argv[1:])
    header = (
        f"device: {device}; date: {stamp:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}, flashinfer {version}\n"
        f"command: {command}\n"
        f"ceilings: copy {bench.copy_gbps:.0f} GB/s (read + write), "
        f"bf16 matmul {bench.matmul_tflops:.0f} TFLOP/s\n"
        "'vs peer' on a fastgen row: the best FlashInfer variant's time / fastgen's (> 1: fastgen is faster)"
    )
    ratios = []
    for d in details:
        speed = d["fastgen_speed_over_best_flashinfer"]
        ratios.append(
            f"- {d['case']['name']}: fastgen / best FlashInfer: " + (f"**{speed:.2f}x**" if speed else "-")
        )
    first_calls = [
        f"- {d['case']['name']} / {r['impl']}: {r['first_call_s']:.1f} s"
        for d in details
        for r in d["flashinfer"]
        if "first_call_s" in r
    ]
    text = table(bench.rows)
    print(header, text, "", *ratios, sep="\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"flashinfer-{_device_slug(device)}-{stamp:%Y%m%d-%H%M}"
    sections = [
        "# FlashInfer as a kernel peer: paged attention", f"```\n{header}\n```", text,
        "## fastgen / FlashInfer per case", "\n".join(ratios),
        "## FlashInfer's first calls (JIT build or cache load + plan; outside the times)",
        "\n".join(first_calls),
        "## Failures", "\n".join(f"- {line}" for line in failures) or "- none",
        "## Method", __doc__ or "",
    ]  # fmt: skip
    stem.with_suffix(".md").write_text("\n\n".join(sections))
    data = {
        "device": device, "date": stamp.isoformat(timespec="seconds"), "command": command,
        "torch": torch.__version__, "triton": triton.__version__, "flashinfer": version,
        "copy_gb_per_s": bench.copy_gbps, "matmul_tflop_per_s": bench.matmul_tflops,
        "rows": [asdict(r) for r in bench.rows], "cases": details, "failures": failures,
    }  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(f"wrote {stem}.md and {stem}.json")


def smoke_run() -> int:
    """CPU: the page-table conversion and the CSR reference agree with fastgen's reference
    attention on small cases of each kind (what makes the GPU comparison one of the same data)."""
    from fastgen.kernels.attention import paged_attention_reference

    worst = 0.0
    for case in cases(smoke=True):
        batch = paged_batch(case, "cpu", torch.float32)
        indptr, indices, last_page_len = flashinfer_page_table(
            batch["block_tables"], batch["context_lens"], BLOCK_SIZE
        )
        scale = HEAD_DIM**-0.5
        expected = paged_attention_reference(**batch, scale=scale)
        got = csr_attention_reference(
            batch["query"], batch["key_cache"], batch["value_cache"], batch["query_start"],
            indptr, indices, last_page_len, scale,
        )  # fmt: skip
        error = relative_error(got, expected)
        worst = max(worst, error)
        print(f"{case.name}: CSR page table reference vs fastgen reference, relative error {error:.1e}")
    print(f"smoke: worst relative error {worst:.1e}")
    return 0 if worst < 1e-5 else 1


def _device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-").removeprefix("nvidia-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", type=lambda text: text.split(","), default=[], help="decode,prefill")
    parser.add_argument(
        "--compile-only", action="store_true", help="build FlashInfer's kernels on small cases, time nothing"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU check of the page-table conversion")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke_run()
    if not torch.cuda.is_available():
        print("flashinfer_peer: SKIPPED: no CUDA device (FlashInfer and the Triton kernel need one); "
              "--smoke checks the page-table conversion on a CPU")  # fmt: skip
        return 0
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fastgen-flashinfer")
    try:
        import flashinfer
    except Exception as exc:  # not installed, or a dependency of its import is missing
        print(
            f"flashinfer_peer: SKIPPED: flashinfer is not importable ({exc!r}); install "
            "flashinfer-python==0.6.14 with apache-tvm-ffi, ninja and nvidia-ml-py (../shared/gpu/README.md)"
        )
        return 0
    print(f"flashinfer {flashinfer.__version__}, JIT cache under {os.environ['FLASHINFER_WORKSPACE_BASE']}")
    sys.path.insert(0, str(HERE))
    return gpu_run(args)


if __name__ == "__main__":
    sys.exit(main())
