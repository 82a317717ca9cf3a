"""Rotary position embedding: the cos/sin cache (with the scaled variants) and its application."""

from __future__ import annotations

import json
import math
import weakref
from typing import Any

import torch
from torch import nn

from fastgen import kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# cos/sin tables by their settings and device, alive while a module holds them: the layers of a
# model share one table instead of computing one each (seconds of a CPU start-up for 30 layers)
_TABLES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def inverse_frequencies(
    rotary_dim: int, base: float, scaling: dict[str, Any] | None, max_model_len: int, max_position: int
) -> torch.Tensor:
    """Per-pair inverse frequencies, float32, with ``scaling`` (HF ``rope_scaling``) applied.

    Dynamic NTK scaling is computed once for ``max_model_len`` (longer than the model's
    ``max_position`` only when the user asks for it), not per sequence: within the original
    context the frequencies equal the default ones.
    """
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    factor = float((scaling or {}).get("factor", 1.0))
    if rope_type == "dynamic" and max_model_len > max_position:
        base = base * ((factor * max_model_len / max_position) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2)
        )
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, factor, scaling or {})
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, factor: float, scaling: dict[str, Any]) -> torch.Tensor:
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = original_len / low_freq_factor
    short_wavelength = original_len / high_freq_factor
    scaled = torch.where(wavelength > long_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies NeoX-style rotary embedding in place to the first ``rotary_dim`` features."""

    def __init__(
        self,
        rotary_dim: int,
        *,
        base: float,
        max_positions: int,
        max_model_len: int,
        scaling: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.rotary_dim = rotary_dim
        key = (rotary_dim, base, json.dumps(scaling, sort_keys=True), max_model_len, max_positions)
        key += (str(torch.get_default_device()),)
        cache = _TABLES.get(key)
        if cache is None:
            inv_freq = inverse_frequencies(rotary_dim, base, scaling, max_model_len, max_positions)
            positions = torch.arange(max(max_model_len, max_positions), dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]
            cache = _TABLES[key] = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        return kernels.apply_rotary(positions, query, key, self.cos_sin_cache, self.rotary_dim)


class LogLengthScaling(nn.Module):
    """Scales queries past ``base_length`` positions by ``log(position + 1) / log(base_length)``
    (Qwen's ``use_logn_attn``), in place; positions within it keep scale 1. The factors are a table
    of float32 values computed in double precision, as Qwen's own code computes them."""

    def __init__(self, base_length: int, max_positions: int):
        super().__init__()
        factors = [math.log(p + 1, base_length) if p + 1 > base_length else 1.0 for p in range(max_positions)]
        self.register_buffer("factors", torch.tensor(factors, dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``query`` ``[tokens, heads, head_dim]`` times each token's factor (in place)."""
        return query.mul_(self.factors[positions].to(query.dtype)[:, None, None])
