"""What the compiler makes of the paged-attention kernel for an H100 (sm_90), on a machine without one.

Triton compiles for any target on the CPU; its wheel ships ``ptxas``, ``cuobjdump`` and ``nvdisasm``.
Per launch config this reports what decides a kernel's speed before it runs: registers a thread
(and spill), shared memory, how the dots are lowered (Hopper ``wgmma`` or ``mma.sync``) and whether
a ``wgmma`` stays in flight (``wgmma.wait_group N``: N = 0 waits for every one at once), the loads
(``cp.async``: pipelined; ``LDG``: plain), and the SASS instruction mix (``F2F``/``PRMT``: numeric
conversions; ``LDS``/``LDSM``: scalar and ``ldmatrix`` shared loads).

    python -m benchmarks.sm90_compile --launch chunk --configs m128n128w8s3,m128n64w8s3
    python -m benchmarks.sm90_compile --launch decode --cache-dtype fp8 --configs n128w4s2 --f16-dots

The arguments that a real launch specializes (pointers, strides) get Triton's divisibility
attribute: without it every load looks unaligned, nothing is pipelined and the register counts
mean nothing. GQA group 4 and head dim 128 (the Llama-3-8B shape), block size 16. Run it without
``TRITON_INTERPRET`` (the interpreter replaces the kernels this compiles). The figures depend on the
Triton version (printed): for the GPU image's, put ``triton==3.6.0`` first on ``PYTHONPATH``
(``pip install --no-deps --target DIR triton==3.6.0``).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from fastgen.kernels import attention_triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_POINTERS = ("query_ptr", "key_cache_ptr", "value_cache_ptr", "out_ptr", "partial_out_ptr", "partial_lse_ptr",
             "query_start_ptr", "context_lens_ptr", "block_tables_ptr")
_UNALIGNED = ("query_start_ptr", "context_lens_ptr", "block_tables_ptr")  # views at any offset
_ALIGNED_INTS = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_kt", "stride_kh",
                 "stride_vb", "stride_vt", "stride_vh", "stride_ps")
_SASS_OPS = ("HGMMA", "HMMA", "LDGSTS", "LDG", "LDS", "LDSM", "F2F", "F2FP", "PRMT")


def parse_config(text: str) -> dict[str, int]:
    """``m128n64w8s3`` (chunk launch) or ``n128w4s2`` (decode launch) -> its numbers by letter."""
    found = dict(re.findall(r"([mnws])(\d+)", text))
    if "".join(f"{k}{v}" for k, v in found.items()) != text or not {"n", "w", "s"} <= set(found):
        raise ValueError(f"config {text!r}: expected e.g. m128n64w8s3 or n128w4s2")
    return {k: int(v) for k, v in found.items()}


def constexprs(launch: str, config: dict[str, int], fp8: bool, f16_dots: bool, group: int = 4) -> dict:
    chunk = launch == "chunk"
    block_m = config.get("m", 128)
    return dict(
        GROUP=group, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, TOKENS=block_m // group if chunk else 1,
        BLOCK_M=block_m, BLOCK_N=config["n"] if chunk else 64, BLOCK_M_DECODE=max(16, group),
        BLOCK_N_DECODE=64 if chunk else config["n"], HAS_PREFILL=chunk, SPLIT=False,
        DOT_PRECISION="tf32", SOFTCAP=0.0, F16_DOT=fp8 and f16_dots, USE_PDL=False,
    )


def compile_launch(launch: str, config: dict[str, int], fp8: bool = False, f16_dots: bool = False) -> dict:
    """Compile one launch config for sm_90 and read its resources and instructions."""
    kernel = attention_triton._paged_attention_kernel
    values = constexprs(launch, config, fp8, f16_dots)
    cache = "*fp8e4nv" if fp8 else "*bf16"
    signature, consts, attrs = {}, {}, {}
    for index, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in values:
            signature[name], consts[(index,)] = "constexpr", values[name]
        elif name in _POINTERS:
            signature[name] = cache if name in ("key_cache_ptr", "value_cache_ptr") else (
                "*fp32" if name.startswith("partial") else "*i32" if name in _UNALIGNED else "*bf16")
            if name not in _UNALIGNED:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
            if name in _ALIGNED_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=config["w"], num_stages=config["s"]),
    )
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    ops = collections.Counter(
        match.split(".")[0]
        for match in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    )
    ptx = compiled.asm["ptx"]
    return {
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "spill_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "shared_bytes": compiled.metadata.shared,
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "wgmma_waits": dict(collections.Counter(
            re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
        )),
        "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
        "sass_total": sum(ops.values()),
        "sass": {op: ops.get(op, 0) for op in _SASS_OPS},
    }


def table(launch: str, rows: dict[str, dict]) -> str:
    lines = [
        "| config | registers (spill B) | shared KB | wgmma | mma.sync | wgmma waits | cp.async | SASS | "
        + " | ".join(_SASS_OPS) + " |",
        "|---" * (8 + len(_SASS_OPS)) + "|",
    ]
    for name, r in rows.items():
        waits = ", ".join(f"{count} x {n}" for n, count in sorted(r["wgmma_waits"].items())) or "-"
        lines.append(
            f"| {launch} {name} | {r['registers']} ({r['spill_bytes']}) | {r['shared_bytes'] / 1024:.0f} | "
            f"{r['wgmma']} | {r['mma_sync']} | {waits} | {r['cp_async']} | {r['sass_total']} | "
            + " | ".join(str(r["sass"][op]) for op in _SASS_OPS) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", choices=("decode", "chunk"), default="chunk")
    parser.add_argument("--configs", default="m128n128w8s3,m128n64w8s3",
                        help="comma list: m<BLOCK_M>n<BLOCK_N>w<warps>s<stages> (chunk), n..w..s.. (decode)")
    parser.add_argument("--cache-dtype", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--f16-dots", action="store_true", help="an FP8 cache's dots in float16")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    args = parser.parse_args()
    fp8 = args.cache_dtype == "fp8"
    rows = {name: compile_launch(args.launch, parse_config(name), fp8, args.f16_dots)
            for name in args.configs.split(",")}
    if args.json:
        print(json.dumps({"triton": triton.__version__, "configs": rows}, indent=1))
    else:
        print(f"sm_90, Triton {triton.__version__}, {args.cache_dtype} cache, GQA group 4, head dim 128\n")
        print(table(args.launch, rows))


if __name__ == "__main__":
    main()
