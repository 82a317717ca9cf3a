"""Programmatic dependent launch: every kernel that may be launched early waits first."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import fastgen.kernels as kernels_package
import pytest
import torch
from fastgen.kernels._dispatch import pdl_launch


def pdl_kernels() -> list[tuple[str, ast.FunctionDef]]:
    """(module, kernel) for every ``@triton.jit`` function with a ``USE_PDL`` parameter."""
    found = []
    for path in sorted(Path(inspect.getfile(kernels_package)).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or path.name == "pdl.py":  # pdl.py: the wait itself
                continue
            if any(arg.arg == "USE_PDL" for arg in node.args.args):
                found.append((path.name, node))
    return found


def test_the_decode_kernels_take_part():
    names = {node.name for _, node in pdl_kernels()}
    assert {"_gemv_kernel", "_paged_attention_kernel", "_merge_splits_kernel", "_rotary_kv_kernel",
            "_norm_kernel", "_silu_and_mul_kernel", "_write_kv_cache_kernel"} <= names


@pytest.mark.parametrize("module,kernel", pdl_kernels(), ids=lambda item: getattr(item, "name", item))
def test_a_kernel_waits_before_anything_else(module, kernel):
    body = kernel.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    first = body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), f"{module}: {kernel.name}"
    call = first.value
    assert ast.unparse(call) == "wait_for_previous(USE_PDL)", f"{module}: {kernel.name}: {ast.unparse(call)}"


# compiled in a process of its own: the test session runs kernels in Triton's interpreter
COMPILE_PTX = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from fastgen.kernels.activation import _silu_and_mul_kernel
use_pdl = sys.argv[1] == "1"
signature = {"x_ptr": "*bf16", "out_ptr": "*bf16", "width": "i32", "stride_x_row": "i32",
             "stride_out_row": "i32", "BLOCK": "constexpr", "USE_PDL": "constexpr"}
source = triton.compiler.ASTSource(fn=_silu_and_mul_kernel, signature=signature,
                                   constexprs={"BLOCK": 1024, "USE_PDL": use_pdl})
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": use_pdl}).asm["ptx"])
"""


def compiled_ptx(use_pdl: bool) -> str:
    """The SiLU-mul kernel's sm_90 PTX (no GPU needed: Triton's own ptxas)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_PTX, "1" if use_pdl else "0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_wait_comes_before_the_first_global_access_in_sm90_code():
    ptx = compiled_ptx(True).splitlines()
    wait = next(i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line)
    first_access = next(i for i, line in enumerate(ptx) if "ld.global" in line or "st.global" in line)
    assert wait < first_access
    assert any("griddepcontrol.launch_dependents" in line for line in ptx)
    assert "griddepcontrol" not in compiled_ptx(False)


def test_cpu_tensors_launch_ordinarily():
    assert pdl_launch(torch.zeros(1)) == {"USE_PDL": False}
