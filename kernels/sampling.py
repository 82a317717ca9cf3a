"""Sampling from a batch of logits with per-row parameters.

Per row ``r``: ``temperature[r] == 0`` means greedy (argmax of the raw logits). Otherwise the
logits are divided by the temperature, restricted to the ``top_k[r]`` largest (0 = no limit),
then to the smallest set whose probability reaches ``top_p[r]`` (1.0 = no limit), and one token is
drawn by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``: the same distribution as a
multinomial draw, in one pass. ``E`` is a deterministic function of ``seeds[r]`` alone, so a row's
draw never depends on what else is in the batch.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def _exponential_noise(seeds: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    noise = torch.empty(len(seeds), vocab_size, device=device)
    generator = torch.Generator(device=device)
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        noise[row].exponential_(generator=generator)
    return noise


def filter_logits_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Float32 logits after temperature, top-k and top-p (removed entries are ``-inf``)."""
    scaled = logits.float() / temperature.float().clamp_min(1e-6)[:, None]
    vocab_size = scaled.shape[-1]
    sorted_logits, _ = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.long().clamp(max=vocab_size), vocab_size)
    kth_value = sorted_logits.gather(1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = mass_before < top_p.float()[:, None]
    keep[:, 0] = True
    # the smallest kept logit is the threshold: everything at or above it stays
    cutoff = sorted_logits.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
    return scaled.masked_fill(scaled < cutoff, float("-inf"))


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Sampled token ids (int64 ``[batch]``) for ``logits`` ``[batch, vocab]``."""
    tokens = logits.argmax(dim=-1)
    sampled_rows = (temperature > 0).nonzero().flatten()
    if sampled_rows.numel() == 0:
        return tokens
    rows = sampled_rows
    filtered = filter_logits_reference(logits[rows], temperature[rows], top_k[rows], top_p[rows])
    probs = torch.softmax(filtered, dim=-1)
    noise = _exponential_noise(seeds[rows].tolist(), logits.shape[-1], logits.device)
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Sample one token per row (Triton on CUDA, reference elsewhere)."""
    impl = sample_triton if use_triton(logits) else sample_reference
    return impl(logits, temperature, top_k, top_p, seeds)
