"""The engine's sampled tokens lie in the set that HF transformers' logits processors keep
(temperature, top-k, top-p, min-p), with HF's distribution teacher-forced on the tokens the engine
drew (float32, CPU). `tests/kernels/test_sampling.py` compares the filters themselves with HF's."""

from __future__ import annotations

import random

import torch

from fastgen import SamplingParams
from tests.helpers import generate_together
from tests.kernels.test_sampling import hf_filtered
from tests.test_logprobs import hf_logprobs

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)
CONFIGS = {
    "top-k": dict(OFF, temperature=1.0, top_k=3),
    "top-p": dict(OFF, temperature=0.7, top_p=0.5),
    "min-p": dict(OFF, temperature=1.5, min_p=0.3),
    "all-four": dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.1),
}
SEEDS = (1, 2, 3, 4)
NEW_TOKENS = 24
SLACK = 1e-3  # the engine's logits differ from HF's by ~1e-5: room for a token exactly at a cutoff


def in_hf_kept_set(
    row: torch.Tensor, token: int, temperature: float, top_k: int, top_p: float, min_p: float
) -> bool:
    """Whether HF's warpers keep ``token`` of ``row`` (log-probabilities), up to `SLACK`: top-p's
    mass and every cutoff logit loosened by it, so that a rounding difference at a boundary is not
    mistaken for a wrong filter (the kept sets are prefixes of the sorted row, ties aside)."""
    kept = torch.isfinite(hf_filtered(row, temperature, top_k, min(top_p + SLACK, 1.0), min_p))
    scaled = row / temperature
    return bool(scaled[token] >= scaled[kept].min() - SLACK)


def test_sampled_tokens_lie_in_hf_kept_sets(llama_path):
    rng = random.Random(0)
    requests = []
    for options in CONFIGS.values():
        prompt = [rng.randrange(3, 384) for _ in range(rng.randint(5, 40))]
        for seed in SEEDS:
            params = SamplingParams(
                max_new_tokens=NEW_TOKENS, ignore_eos=True, do_sample=True, seed=seed, **options
            )
            requests.append((prompt, params))
    outs = generate_together(llama_path, requests, token_budget=64)
    outs_by_config = [outs[i : i + len(SEEDS)] for i in range(0, len(outs), len(SEEDS))]
    requests_by_config = [requests[i : i + len(SEEDS)] for i in range(0, len(requests), len(SEEDS))]
    for name, options, config_outs, config_requests in zip(
        CONFIGS, CONFIGS.values(), outs_by_config, requests_by_config
    ):
        chance_unfiltered = 1.0  # that a sampler ignoring the filters would pass this check
        for out, (prompt, _) in zip(config_outs, config_requests):
            assert len(out.token_ids) == NEW_TOKENS
            rows = hf_logprobs(llama_path, prompt, out.token_ids)
            for position, (token, row) in enumerate(zip(out.token_ids, rows)):
                assert in_hf_kept_set(row, token, **options), (name, position, token)
                kept = torch.isfinite(hf_filtered(row, **options))
                chance_unfiltered *= torch.softmax(row / options["temperature"], -1)[kept].sum().item()
        assert chance_unfiltered < 1e-6, (name, chance_unfiltered)
        assert len({tuple(out.token_ids) for out in config_outs}) == len(SEEDS)  # one prompt: it sampled
