"""Paged attention in parts: ``num_decodes`` (a decode-only launch plus one for the rest, into the
same ``out``) and launches on a suffix of a batch's sequences (views of ``query_start``,
``context_lens`` and ``block_tables``, absolute rows of ``query``/``out``).

Conventions of test_attention.py: fresh random inputs each run, NaN-poisoned outputs, shuffled block
tables with a NaN block past each sequence's last, NaN-filled split-KV scratch; tiny shapes, since
the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from fastgen.kernels import attention, attention_triton
from fastgen.kernels.attention import paged_attention_reference
from fastgen.kernels.attention_triton import paged_attention_triton

from .test_attention import DTYPES, TOLERANCE, check, make_batch, poison_split_scratch, small_tile_config

MHA, GQA = (4, 4, 64, 16), (8, 2, 128, 32)  # (num_heads, num_kv_heads, head_dim, block_size)


@pytest.fixture(autouse=True)
def nan_split_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_split_scratch(monkeypatch)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records each attention launch: its sequences, tokens, max_query_len and split choice input."""
    calls: list[dict] = []
    launch, choose = attention_triton._launch, attention_triton.choose_num_splits

    def spy_launch(*args, **kwargs):
        calls.append({"num_seqs": args[5].shape[0], "num_tokens": kwargs["num_tokens"],
                      "max_query_len": kwargs["max_query_len"]})
        return launch(*args, **kwargs)

    def spy_choose(num_programs, max_context_len, device, **kwargs):
        calls[-1]["split_programs"] = num_programs
        return choose(num_programs, max_context_len, device, **kwargs)

    monkeypatch.setattr(attention_triton, "_launch", spy_launch)
    monkeypatch.setattr(attention_triton, "choose_num_splits", spy_choose)
    return calls


def decodes(count: int, max_context: int) -> list[tuple[int, int]]:
    return [(1, int(c)) for c in torch.randint(1, max_context, (count,))]


# the part after the decodes: chunks with and without earlier context, a decode, an empty sequence
REST = [(37, 37), (1, 20), (12, 160), (0, 0), (70, 85)]


@pytest.mark.parametrize("num_splits", [None, 3], ids=["host-splits", "3-splits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [MHA, GQA], ids=["mha", "gqa"])
def test_num_decodes_two_launches(shape, dtype, num_splits, launches, device, seed) -> None:
    """Decodes first, then the rest: two launches, together equal to the reference. A decode of
    context 600 makes the host split the decode launch (its few programs) but not the chunk one."""
    num_heads, num_kv_heads, head_dim, block_size = shape
    specs = [*decodes(3, 300), (1, 600), *REST]
    check(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, num_splits=num_splits,
          strided_query=True, num_decodes=4)
    num_tokens = sum(q for q, _ in specs)
    assert [(c["num_seqs"], c["num_tokens"], c["max_query_len"]) for c in launches] == [
        (4, 4, 1), (len(REST), num_tokens - 4, 70)]
    if num_splits is None:
        assert launches[0]["split_programs"] == 4 * num_kv_heads


@pytest.mark.parametrize("group", [1, 4])
def test_num_decodes_small_tiles(group, monkeypatch, launches, device, seed) -> None:
    """Small tiles: the chunk launch's first token lies past a whole tile, its chunks span many
    tiles, and the slot search runs over a suffix; with and without splits and a sliding window."""
    monkeypatch.setattr(attention_triton, "launch_config", small_tile_config)
    num_decodes = 16 // group + int(torch.randint(1, 4, ()))
    specs = [*decodes(num_decodes, 100), (45, 45), (9, 300), (1, 16), (30, 64), (2, 2)]
    for num_splits, window in ((None, None), (2, None), (3, 24)):
        check(specs, 2 * group, 2, 64, 16, torch.float16, device, num_splits=num_splits,
              sliding_window=window, num_decodes=num_decodes)
    assert len(launches) == 6


def run_suffix(batch: dict, first_seq: int, out: torch.Tensor, give_maxima: bool, **kwargs) -> None:
    views = {name: batch[name][first_seq:] for name in ("query_start", "context_lens", "block_tables")}
    maxima = {}
    if give_maxima:
        lens = views["query_start"][1:] - views["query_start"][:-1]
        maxima = {"max_query_len": int(lens.max()), "max_context_len": int(views["context_lens"].max())}
    paged_attention_triton(batch["query"], batch["key_cache"], batch["value_cache"], **views, out=out,
                           **maxima, **kwargs)


@pytest.mark.parametrize(("shape", "dtype"), [(MHA, torch.float32), (GQA, torch.float16)],
                         ids=["mha-fp32", "gqa-fp16"])
def test_suffix_launch(shape, dtype, monkeypatch, device, seed) -> None:
    """A launch on the views ``[d:]`` with the full query and out writes exactly the suffix's rows
    ``[query_start[d], query_start[-1])``, equal to the reference; every other row stays NaN."""
    monkeypatch.setattr(attention_triton, "launch_config", small_tile_config)
    num_heads, num_kv_heads, head_dim, block_size = shape
    cases = [  # (specs, first sequence of the suffix)
        ([(1, 40), (20, 20), (1, 90), (3, 33), (1, 5), (25, 60), (1, 130), (0, 0), (7, 7)],
         int(torch.randint(1, 6, ()))),
        ([(6, 6), (1, 40), (1, 700), (1, 3)], 1),  # a decode-only suffix
    ]
    for specs, first_seq in cases:
        batch = make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
        expected = paged_attention_reference(
            batch["query"].float(), batch["key_cache"].float(), batch["value_cache"].float(),
            batch["query_start"], batch["context_lens"], batch["block_tables"], scale=0.1)
        begin, end = int(batch["query_start"][first_seq]), int(batch["query_start"][-1])
        for num_splits, give_maxima in ((None, True), (3, True), (2, False)):
            out = torch.full_like(batch["query"], float("nan"))
            run_suffix(batch, first_seq, out, give_maxima, scale=0.1, num_splits=num_splits)
            assert out[:begin].isnan().all() and out[end:].isnan().all(), "wrote outside the suffix"
            assert not out[begin:end].isnan().any(), "unwritten or NaN outputs"
            torch.testing.assert_close(out[begin:end].float(), expected[begin:end],
                                       atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_num_decodes_edges(launches, device, seed) -> None:
    """``num_decodes`` equal to the number of sequences, or 0, keeps one launch; without the maxima
    the host finds max_query_len and still splits the launches."""
    check(decodes(5, 300), 8, 2, 64, 16, torch.float32, device, num_decodes=5, num_splits=2)
    check([*decodes(2, 50), *REST], 8, 2, 64, 16, torch.float32, device, num_decodes=0)
    check([*decodes(2, 50), *REST], 8, 2, 64, 16, torch.float16, device, num_decodes=2, give_maxima=False)
    assert [c["max_query_len"] for c in launches] == [1, 70, 1, 70]


def test_num_decodes_padding_and_loose_maxima(launches, device, seed) -> None:
    """CUDA-graph shapes: decodes, an empty sequence, padding rows past the last token, and a loose
    ``max_query_len``. Padding rows stay untouched; a part with no tokens launches nothing."""
    batch = make_batch([*decodes(5, 300), (0, 0)], 8, 2, 64, 16, torch.float32, device)
    unpadded = dict(batch)
    batch["query"] = torch.cat([batch["query"], torch.randn_like(batch["query"][:3])])
    expected = paged_attention_reference(**batch, scale=0.125, out=torch.full_like(batch["query"], 7.0))
    for num_decodes in (0, 3, 5):
        for num_splits in (1, 2):
            out = torch.full_like(batch["query"], 7.0)
            paged_attention_triton(**batch, scale=0.125, out=out, max_query_len=4, max_context_len=300,
                                   num_decodes=num_decodes, num_splits=num_splits)
            torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
            assert (out[-3:] == 7.0).all()
    assert [(c["num_seqs"], c["num_tokens"], c["max_query_len"]) for c in launches] == [
        (6, 8, 4)] * 2 + [(3, 3, 1), (3, 5, 4)] * 2 + [(5, 5, 1), (1, 3, 4)] * 2
    launches.clear()
    out = torch.full_like(unpadded["query"], float("nan"))
    paged_attention_triton(**unpadded, scale=0.125, out=out, max_query_len=4, max_context_len=300,
                           num_decodes=5, num_splits=2)
    torch.testing.assert_close(out, expected[:5], atol=2e-4, rtol=2e-4)
    assert [c["num_tokens"] for c in launches] == [5, 0]  # the empty rest returns before launching


def test_num_decodes_out_of_range(device) -> None:
    batch = make_batch([(1, 20), (4, 9)], 4, 2, 64, 16, torch.float32, device)
    for num_decodes in (-1, 3):
        with pytest.raises(ValueError, match="num_decodes"):
            paged_attention_triton(**batch, scale=0.125, num_decodes=num_decodes)


def test_dispatcher_passes_num_decodes(seed) -> None:
    batch = make_batch([(1, 20), (4, 9)], 4, 2, 64, 16, torch.float32, torch.device("cpu"))
    out = attention.paged_attention(**batch, scale=0.125, num_decodes=1)
    torch.testing.assert_close(out, paged_attention_reference(**batch, scale=0.125))


@pytest.mark.gpu
@pytest.mark.parametrize("concurrent", [False, True], ids=["one-stream", "two-streams"])
def test_gpu_two_launches_cuda_graph(concurrent, monkeypatch, seed) -> None:
    """A mixed step with ``num_decodes`` (two launches, both split by the host) runs eagerly,
    captures into a CUDA graph and replays on new contents and context lengths, its launches one
    after the other or at once on two streams."""
    monkeypatch.setattr(attention_triton, "_concurrent", lambda device: concurrent)
    cuda = torch.device("cuda")
    specs = [(1, 300)] * 6 + [(40, 1000), (20, 500)]
    batch = make_batch(specs, 32, 8, 128, 16, torch.bfloat16, cuda)
    out = torch.empty_like(batch["query"])
    kwargs = {"scale": 128**-0.5, "max_query_len": 40, "max_context_len": 1000, "out": out, "num_decodes": 6}
    def expected() -> torch.Tensor:
        return paged_attention_reference(
            batch["query"].float(), batch["key_cache"].float(), batch["value_cache"].float(),
            batch["query_start"], batch["context_lens"], batch["block_tables"], scale=128**-0.5,
        )

    out.fill_(float("nan"))
    paged_attention_triton(**batch, **kwargs)  # eager (and it compiles outside the capture)
    torch.testing.assert_close(out.float(), expected(), atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(**batch, **kwargs)
    for _ in range(2):
        batch["query"].copy_(torch.randn_like(batch["query"]))
        batch["context_lens"][:6].copy_(torch.randint(1, 301, (6,), device=cuda, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out.float(), expected(), atol=2e-2, rtol=2e-2)
