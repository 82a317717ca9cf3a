"""FP8 weights for the linear layers (``EngineConfig.quantization="fp8"``).

W8A8 in float8 e4m3, as H100/H200 tensor cores run it: each weight row (output feature) gets its
own scale when the model is loaded, each activation row (token) its own scale at run time, and
``torch._scaled_mm`` multiplies the two in FP8, accumulates in float32, applies both scales and
rounds once to the activations' dtype. Weights take half the memory and half the bandwidth of
bf16 (the decode-time traffic), prompts run on the FP8 tensor-core rate. Decode batches of up to 8
rows on CUDA skip the activation quantization: the small-batch GEMV kernel reads the FP8 weights
and scales each row's sum (W8A16, ``kernels/gemv.py``). No host synchronization: CUDA graphs
capture both. The LM head, embeddings, norms and MoE experts stay in the model dtype.
"""

from __future__ import annotations

import torch
from fastgen.kernels import quantize_rows
from fastgen.kernels.quant import FP8
from torch import nn

__all__ = ["FP8", "fp8_linear", "quantize_linear_layers", "quantize_rows"]


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with ``x`` quantized per row to FP8 first;
    ``weight`` [N, K] in FP8, ``weight_scale`` [N, 1] float32."""
    rows = x.reshape(-1, x.shape[-1])
    quantized, scale = quantize_rows(rows)
    out = torch._scaled_mm(
        quantized, weight.t(), scale_a=scale, scale_b=weight_scale.t(), out_dtype=x.dtype
    )
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantize_linear_layers(model: nn.Module, layer_types: tuple[type, ...]) -> int:
    """Replace the weights of every ``layer_types`` module by FP8 weights and their row scales
    (``module.weight_scale``); returns how many layers changed."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, layer_types):
            rows, columns = module.weight.shape
            if rows % 16 or columns % 16:  # what the FP8 tensor-core GEMM needs of each rank's shard
                raise ValueError(
                    f"fp8 quantization needs layer shapes in multiples of 16; {name} is {rows} x {columns}"
                )
            quantized, scale = quantize_rows(module.weight.data)
            module.weight = nn.Parameter(quantized, requires_grad=False)
            module.weight_scale = scale
            count += 1
    return count
