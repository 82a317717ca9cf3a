"""Sampling: the reference filters against HF transformers' logits processors, and the Triton
sampler against the reference.

The Triton sampler draws its noise from Philox, not from torch's generator, so it is compared with
the reference exactly where the semantics are exact (greedy rows, top_k=1, the set of tokens kept by
temperature/top-k/top-p, reproducibility per seed) and statistically for the draw itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fastgen.kernels.sampling import filter_logits_reference, order_keys, sample_reference, sample_triton
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from fastgen.plan import SamplingOptions
from fastgen.runner import _drop_below_min_p

# ---- the filters against HF's logits processors ----


def hf_filtered(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """One row of logits after HF's warpers, in the engine's (and vLLM's) order: temperature, min-p,
    top-k, top-p. HF's own ``generate`` applies min-p last; the kept sets differ only when min-p and
    top-p are combined (top-p then counts the mass that min-p left, as in vLLM)."""
    warpers = [TemperatureLogitsWarper(temperature)]
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    scores = logits.float()[None]
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0]


def engine_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """One row after the engine's filters: the runner's min-p, then `filter_logits_reference`."""
    options = SamplingOptions(temperature, top_k, top_p, None, 0, [], min_p=min_p)
    rows = logits.float()[None].clone()
    _drop_below_min_p(rows, [SimpleNamespace(sampling=options)])
    one = torch.ones(1)
    return filter_logits_reference(rows, one * temperature, one.int() * top_k, one * top_p)[0]


def away_from_boundaries(values: torch.Tensor, target: float, margin: float = 1e-4) -> float:
    """``target`` lowered, if needed, until no value lies within ``margin`` of it: a threshold that
    float32 rounding could put on either side of a token is not a test of the semantics. (It ends:
    below the smallest value there is nothing to avoid.)"""
    while (values - target).abs().min() < margin:
        target -= margin
    return target


def extreme_rows(vocab_size: int) -> list[torch.Tensor]:
    """Rows that stress the filters: ties everywhere, ties at the top, one-ulp near-ties, huge
    magnitudes, masked tokens, fewer finite tokens than top-k, bfloat16-rounded logits."""
    rows = [
        torch.zeros(vocab_size),  # every token tied
        torch.randint(-3, 4, (vocab_size,)).float(),  # seven values, many ties each
        torch.randn(vocab_size).to(torch.bfloat16).float() * 3,  # bfloat16 ties
        torch.randn(vocab_size) * 1e4,  # softmax saturates: probabilities exactly 0 and 1
        torch.full((vocab_size,), -1e4).index_fill(0, torch.tensor([3, 9, 40]), 1e4),  # a 3-way tie on top
    ]
    near = torch.randn(vocab_size)
    near[1::2] = torch.nextafter(near[0::2], torch.tensor(float("inf")))  # pairs one ulp apart
    rows.append(near)
    masked = torch.randn(vocab_size) * 2
    masked[torch.rand(vocab_size) < 0.5] = float("-inf")
    rows.append(masked)
    few = torch.full((vocab_size,), float("-inf"))
    few[:5] = torch.randn(5)
    rows.append(few)
    return rows


@pytest.mark.parametrize("vocab_size", [64, 1000])
def test_kept_sets_match_hf_logits_processors(vocab_size, seed) -> None:
    """The tokens the engine's filters keep are HF's: with ties at the cutoff, the engine keeps every
    tied token (as HF's top-k does) where HF's top-p keeps those its sort happens to put first, so
    the engine's set is exactly every token at or above the smallest logit HF keeps."""
    rows = [torch.randn(vocab_size) * scale for scale in (0.3, 1.0, 4.0) for _ in range(4)]
    rows += extreme_rows(vocab_size)
    settings = []
    for row in rows:
        for _ in range(6):
            temperature = float(torch.empty(1).uniform_(0.05, 5.0))
            top_k = int(torch.randint(0, vocab_size + 8, (1,)))
            top_k = top_k if top_k % 3 else 0  # a third of them without top-k
            # thresholds away from where float32 rounding decides: top-p from the cumulative mass
            # after min-p and top-k, min-p from the probabilities relative to the largest
            scaled = row.double() / temperature
            ratios = torch.exp(scaled - scaled.max())
            min_p = float(torch.rand(1)) ** 2 if torch.rand(1) < 0.6 else 0.0
            min_p = max(away_from_boundaries(ratios, min_p), 0.0) if min_p else 0.0  # <= 0: off
            before_top_p = hf_filtered(row, temperature, top_k, 1.0, min_p).double()
            mass = torch.softmax(before_top_p, -1).sort(descending=True).values.cumsum(-1)
            top_p = float(torch.rand(1)) if torch.rand(1) < 0.7 else 1.0
            top_p = away_from_boundaries(mass, top_p) if top_p < 1.0 else 1.0
            settings.append((row, temperature, top_k, top_p, min_p))
    for row, temperature, top_k, top_p, min_p in settings:
        hf = hf_filtered(row, temperature, top_k, top_p, min_p)
        mine = engine_filtered(row, temperature, top_k, top_p, min_p)
        hf_kept = torch.isfinite(hf)
        scaled = row.float() / temperature
        expected = torch.isfinite(row) & (scaled >= scaled[hf_kept].min())
        context = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        assert torch.equal(torch.isfinite(mine), expected), (context, hf_kept.sum())
        assert torch.equal(mine[expected], scaled[expected]), context  # temperature-scaled logits
        assert torch.equal(hf[hf_kept], scaled[hf_kept]), context


def test_the_filters_are_not_vacuous(seed) -> None:
    """The comparison above has teeth: each filter on its own changes HF's kept set."""
    row = torch.randn(200) * 2
    everything = torch.isfinite(hf_filtered(row, 1.0, 0, 1.0, 0.0)).sum()
    for top_k, top_p, min_p in ((10, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.1)):
        kept = torch.isfinite(hf_filtered(row, 1.0, top_k, top_p, min_p))
        assert 0 < kept.sum() < everything
        assert torch.equal(torch.isfinite(engine_filtered(row, 1.0, top_k, top_p, min_p)), kept)


# ---- the Triton sampler against the reference ----


def random_params(batch: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-row parameters covering greedy rows, top-k only, top-p only, both and neither."""
    temperature = (torch.rand(batch) * 1.5 + 0.2).to(device)
    top_k = torch.randint(1, 80, (batch,), dtype=torch.int32)
    top_p = torch.rand(batch) * 0.95 + 0.02
    top_k[0::4] = 0  # no top-k
    top_p[1::4] = 1.0  # no top-p
    top_k[2::8] = vocab_size + 5  # larger than the vocab: no limit
    top_p[2::8] = 1.0
    temperature[3::8] = 0.0  # greedy
    return {
        "temperature": temperature.to(device),
        "top_k": top_k.to(device),
        "top_p": top_p.to(device),
        "seeds": torch.randint(0, 2**62, (batch,), device=device),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab_size", [100, 3000])
def test_kept_set_matches_reference(vocab_size, dtype, device, seed) -> None:
    """The cutoff the kernel finds keeps exactly the reference's tokens (ties included: bfloat16
    logits have many), and every draw is one of them."""
    batch = 16
    logits = torch.randn(batch, vocab_size) * 4
    logits[5, torch.rand(vocab_size) < 0.3] = float("-inf")  # masked-out tokens
    logits[6, 10:] = float("-inf")  # fewer finite tokens than top_k
    logits = logits.to(dtype).to(device)
    params = random_params(batch, vocab_size, device)
    params["top_k"][6] = 40
    cutoffs = torch.full((batch,), 12345, dtype=torch.int32, device=device)
    tokens = sample_triton(logits, **params, cutoffs=cutoffs)
    sampled = params["temperature"] > 0
    filtered = filter_logits_reference(
        logits[sampled], params["temperature"][sampled], params["top_k"][sampled], params["top_p"][sampled]
    )
    expected_kept = torch.isfinite(filtered)
    finite = torch.isfinite(logits[sampled])
    kept = (order_keys(logits[sampled]) >= cutoffs[sampled][:, None]) & finite
    assert torch.equal(kept, expected_kept), (kept.sum(1), expected_kept.sum(1))
    assert expected_kept.gather(1, tokens[sampled][:, None]).all(), "drew a filtered-out token"
    torch.testing.assert_close(tokens[~sampled], logits[~sampled].argmax(-1))


def test_greedy_rows_take_the_first_maximum(device, seed) -> None:
    logits = torch.randn(6, 2500, device=device)
    logits[1, [7, 1500, 2400]] = 50.0  # ties: the first index wins, as in torch.argmax
    logits[2, 2499] = 60.0  # maximum in the last, partial block
    params = random_params(6, 2500, device)
    params["temperature"][:] = 0.0
    tokens = sample_triton(logits, **params)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, sample_reference(logits, **params))
    assert tokens[1] == 7 and tokens[2] == 2499


def test_top_k_one_is_greedy(device, seed) -> None:
    logits = torch.randn(12, 700, device=device) * 3
    params = random_params(12, 700, device)
    params["temperature"][:] = torch.rand(12, device=device) + 0.1
    params["top_k"][:] = 1
    assert torch.equal(sample_triton(logits, **params), logits.argmax(-1))


def test_same_seed_same_draw_whatever_the_batch(device, seed) -> None:
    vocab_size = 500
    logits = torch.randn(10, vocab_size, device=device) * 2
    params = random_params(10, vocab_size, device)
    tokens = sample_triton(logits, **params)
    order = torch.randperm(10, device=device)
    shuffled = sample_triton(logits[order], **{k: v[order] for k, v in params.items()})
    assert torch.equal(shuffled, tokens[order])
    alone = sample_triton(logits[4:5], **{k: v[4:5] for k, v in params.items()})
    assert alone.item() == tokens[4].item()
    bigger = torch.cat([torch.randn(5, vocab_size, device=device), logits])
    more_params = random_params(5, vocab_size, device)
    merged = {k: torch.cat([more_params[k], params[k]]) for k in params}
    assert torch.equal(sample_triton(bigger, **merged)[5:], tokens)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic; an observed token of probability 0 makes it infinite."""
    expected = probs * counts.sum()
    if (counts[expected == 0] > 0).any():
        return float("inf")
    seen = expected > 0
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


def test_draws_follow_the_filtered_distribution(device, seed) -> None:
    """Frequencies over many seeds match the reference's filtered softmax (chi-square, 4 degrees
    of freedom, threshold at p ~ 1e-6), and the same test rejects plausible wrong filters."""
    draws, vocab_size = 800, 12
    # five kept tokens, a close sixth, a far tail; shuffled and jittered each run
    base = torch.tensor([1.2, 1.0, 0.8, 0.6, 0.45, 0.4, -1.0, -1.2, -1.5, -2.0, -2.5, -3.0])
    logits = (base + torch.rand(vocab_size) * 0.02)[torch.randperm(vocab_size)].to(device)
    row = logits.expand(draws, vocab_size)
    temperature = torch.full((draws,), 0.5, device=device)
    top_k = torch.full((draws,), 5, dtype=torch.int32, device=device)
    top_p = torch.ones(draws, device=device)
    seeds = torch.randint(0, 2**62, (draws,), device=device)
    tokens = sample_triton(row, temperature, top_k, top_p, seeds)
    counts = torch.bincount(tokens, minlength=vocab_size).float()

    def filtered_probs(temp: float, k: int) -> torch.Tensor:
        one = torch.ones(1, device=device)
        return torch.softmax(filter_logits_reference(logits[None], one * temp, one.int() * k, one), -1)[0]

    threshold = 33.4  # chi-square, 4 dof, upper tail 1e-6
    assert chi_square(counts, filtered_probs(0.5, 5)) < threshold
    # power: a wrong temperature or top-k, or no filter, fails (expected statistics >= 50)
    for temp, k in ((1.5, 5), (0.5, 4), (0.5, 6), (0.5, vocab_size)):
        assert chi_square(counts, filtered_probs(temp, k)) > threshold, (temp, k)


# ---- GPU: real vocabularies (python -m pytest -m gpu tests/kernels) ----


@pytest.mark.gpu
@pytest.mark.parametrize("vocab_size", [32000, 128256])
def test_gpu_real_vocab(vocab_size, seed) -> None:
    cuda = torch.device("cuda")
    batch = 64
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(batch, vocab_size, device=cuda) * 3).to(dtype)
        params = random_params(batch, vocab_size, cuda)
        cutoffs = torch.empty(batch, dtype=torch.int32, device=cuda)
        tokens = sample_triton(logits, **params, cutoffs=cutoffs)
        sampled = params["temperature"] > 0
        expected_kept = torch.isfinite(
            filter_logits_reference(
                logits[sampled],
                params["temperature"][sampled],
                params["top_k"][sampled],
                params["top_p"][sampled],
            )
        )
        kept = order_keys(logits[sampled]) >= cutoffs[sampled][:, None]
        rows = {name: value[sampled] for name, value in params.items()}
        assert_kept_sets_agree(logits[sampled], rows, kept, expected_kept)
        assert kept.gather(1, tokens[sampled][:, None]).all()
        assert torch.equal(tokens[~sampled], logits[~sampled].argmax(-1))


def assert_kept_sets_agree(
    logits: torch.Tensor, params: dict[str, torch.Tensor], kept: torch.Tensor, expected: torch.Tensor
) -> None:
    """The kernel's kept sets equal the reference's, except where the top-p cutoff is a float32
    rounding call: both sum the same probabilities in different orders, so when the mass at or
    above a logit lies within rounding of ``top_p`` they may stop one distinct logit apart. Such a
    row passes only if the two cutoffs are adjacent distinct logits and the float64 mass at or
    above the higher one is within 1e-4 of ``top_p`` (a 128k-token float32 sum's error is ~1e-5)."""
    for row in (kept != expected).any(dim=1).nonzero().flatten().tolist():
        top_p = float(params["top_p"][row])
        assert top_p < 1.0, f"row {row}: kept sets differ without top-p"
        values = logits[row].double() / max(float(params["temperature"][row]), 1e-6)
        top_k = int(params["top_k"][row])
        if 0 < top_k < values.numel():
            values = values.masked_fill(values < values.topk(top_k).values[-1], float("-inf"))
        cutoffs = sorted({float(values[kept[row]].min()), float(values[expected[row]].min())})
        distinct = values.unique()
        between = distinct[(distinct > cutoffs[0]) & (distinct < cutoffs[1])]
        assert between.numel() == 0, f"row {row}: cutoffs {cutoffs} are not adjacent logits"
        probabilities = torch.softmax(values, dim=0)
        mass = float(probabilities[values >= cutoffs[1]].sum())
        assert abs(mass - top_p) < 1e-4, f"row {row}: mass {mass} at the cutoff is far from top_p {top_p}"


@pytest.mark.gpu
def test_gpu_distribution_many_draws(seed) -> None:
    """Total variation between 40k draws and the filtered distribution, top-k and top-p together."""
    cuda = torch.device("cuda")
    draws, vocab_size = 40000, 32000
    logits = torch.randn(vocab_size, device=cuda) * 2.5
    row = logits.expand(draws, vocab_size)
    temperature = torch.full((draws,), 0.9, device=cuda)
    top_k = torch.full((draws,), 40, dtype=torch.int32, device=cuda)
    top_p = torch.full((draws,), 0.8, device=cuda)
    seeds = torch.randint(0, 2**62, (draws,), device=cuda)
    tokens = sample_triton(row, temperature, top_k, top_p, seeds)
    probs = torch.softmax(filter_logits_reference(logits[None], temperature[:1], top_k[:1], top_p[:1]), -1)[0]
    frequencies = torch.bincount(tokens, minlength=vocab_size).float() / draws
    assert (frequencies[probs == 0] == 0).all()
    assert 0.5 * (frequencies - probs).abs().sum() < 0.02
