"""fastgen kernels: each op is a Triton kernel beside a plain-PyTorch reference of the same
signature. The public functions dispatch on the tensor's device: Triton on CUDA, the reference
on CPU (``FASTGEN_KERNELS=reference`` forces the reference)."""

from ._dispatch import fusion_enabled, reference_forced
from .activation import gelu, silu_and_mul
from .argmax import greedy_argmax
from .attention import paged_attention
from .cache import write_kv_cache
from .fused_linear import rms_norm_linear, silu_and_mul_linear
from .gemv import linear_small_batch
from .moe import fused_moe
from .norm import layer_norm, rms_norm
from .qkv_rotary import NormArgs, RotaryKVWrite, qkv_rotary_linear
from .quant import quantize_rows
from .rotary import apply_rotary
from .rotary_kv import rotary_and_write_kv_cache
from .sampling import sample

__all__ = [
    "NormArgs",
    "RotaryKVWrite",
    "apply_rotary",
    "fused_moe",
    "fusion_enabled",
    "gelu",
    "greedy_argmax",
    "layer_norm",
    "linear_small_batch",
    "paged_attention",
    "qkv_rotary_linear",
    "quantize_rows",
    "reference_forced",
    "rms_norm",
    "rms_norm_linear",
    "rotary_and_write_kv_cache",
    "sample",
    "silu_and_mul",
    "silu_and_mul_linear",
    "write_kv_cache",
]
