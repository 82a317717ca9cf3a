"""The engine on a CUDA GPU (Triton kernels, CUDA graphs). Run on the GPU machine:

python -m pytest -m gpu tests/test_gpu_engine.py
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from fastgen import EngineConfig, SamplingParams
from fastgen.models.config import ModelConfig
from fastgen.plan import SamplingOptions, SequenceChunk, SequenceStart, StepPlan
from fastgen.runner import ModelRunner
from tests.helpers import collect, engine_greedy
from tests.models.test_hf_parity import CASES, hf_reference, prompts_of_mixed_lengths

pytestmark = pytest.mark.gpu

GREEDY = SamplingOptions(
    temperature=0.0, top_k=0, top_p=1.0, seed=None, min_new_tokens=0, suppressed_token_ids=[]
)


def hf_greedy_cuda(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    # eager attention is HF's reference path; older transformers pick SDPA for Gemma 2 on CUDA, which
    # drops the attention-score soft cap
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model = model.cuda().eval()
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt], device="cuda"),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


GPU_CASES = [
    "llama-mha",
    "llama-gqa-llama3-rope",
    "mistral-sliding-window",
    "qwen2-qkv-bias",
    "qwen3-qk-norm-head-dim",
    "phi-parallel-block-partial-rotary",
    "mixtral-top2-of-4-experts",
    "gemma-geglu-mqa-offset-norms-scaled-embeddings",
    "gemma2-softcaps-alternating-windows-sandwich-norms",
    "gemma3-text-qk-norms-rope-per-layer-type",
    "gemma3-multimodal-checkpoint-served-as-text",
    "falcon-7b-multi-query-parallel-block",
    "falcon-40b-grouped-kv-two-norms",
    "falcon-sequential-interleaved-qkv-biases",
    "opt-pre-norm-relu-learned-positions",
    "opt-350m-post-norm-projections-tied",
    "qwen-v1-fused-c-attn",
]


# a set KV cache size, not a share of free memory: parallel test workers share the GPU
KV_BYTES = 1 << 28


@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_float32_greedy_matches_hf_on_gpu(toy_checkpoint, case, cuda_graphs):
    family, overrides = CASES[case]
    path = toy_checkpoint(family, **overrides)
    prompts = prompts_of_mixed_lengths(384)
    expected = hf_greedy_cuda(hf_reference(path, family), prompts, 24)
    got = engine_greedy(
        path, prompts, 24, token_budget=16, device="cuda", cuda_graphs=cuda_graphs, kv_cache_bytes=KV_BYTES
    )
    assert got == expected


def test_bfloat16_top1_agreement_with_teacher_forcing(toy_checkpoint):
    """Our bf16 engine's argmax equals HF float32's on >= 99% of 2,000 teacher-forced positions.

    The model is trained for a few hundred steps first: random weights give near-tied logits on
    which even HF's own bf16 disagrees with its float32 on ~4% of positions."""
    from transformers import AutoModelForCausalLM

    path = toy_checkpoint(
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
        weight_std=0.05,
        train_steps=200,
        train_device="cuda",
    )
    rng = random.Random(0)
    num_seqs, new_tokens = 8, 250
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(5, 60))] for _ in range(num_seqs)]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    reference.generation_config.eos_token_id = None
    sequences = []
    with torch.no_grad():
        for prompt in prompts:
            out = reference.generate(
                torch.tensor([prompt], device="cuda"),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            sequences.append(out[0].tolist())
    config = EngineConfig(dtype="bfloat16", device="cuda", num_kv_blocks=256, block_size=16)
    runner = ModelRunner(path, config, ModelConfig.from_pretrained(path), 512)
    blocks_per_seq = 32
    starts = [SequenceStart(i, GREEDY, 0) for i in range(num_seqs)]
    prefill = [
        SequenceChunk(i, prompts[i], 0, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), True)
        for i in range(num_seqs)
    ]
    predicted = [runner.execute(StepPlan(0, [], starts, prefill)).sampled_token_ids]
    for step in range(new_tokens - 1):
        chunks = []
        for i in range(num_seqs):
            position = len(prompts[i]) + step
            chunks.append(SequenceChunk(i, [sequences[i][position]], position, [], True))  # teacher forcing
        predicted.append(runner.execute(StepPlan(step + 1, [], [], chunks)).sampled_token_ids)
    agree = total = 0
    for step, row in enumerate(predicted):
        for i, token in enumerate(row):
            agree += token == sequences[i][len(prompts[i]) + step]
            total += 1
    assert total == num_seqs * new_tokens >= 2000
    # context: how often HF itself in bf16 agrees with HF float32 on the same positions
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    hf_agree = 0
    with torch.no_grad():
        for i, sequence in enumerate(sequences):
            logits = bf16(torch.tensor([sequence[:-1]], device="cuda")).logits[0]
            hf_predicted = logits[len(prompts[i]) - 1 :].argmax(-1).tolist()
            hf_agree += sum(a == b for a, b in zip(hf_predicted, sequence[len(prompts[i]) :]))
    print(f"top-1 agreement with HF fp32: fastgen bf16 {agree / total:.4f}, HF bf16 {hf_agree / total:.4f}")
    assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f} (HF bf16: {hf_agree / total:.4f})"


def test_bfloat16_engine_serves_concurrent_sampled_and_cancelled_requests(llama_path):
    from fastgen import AsyncEngine

    async def main():
        config = EngineConfig(device="cuda", token_budget=64, kv_cache_bytes=KV_BYTES)
        engine = await AsyncEngine.start(llama_path, config)
        async with engine:
            seeded = SamplingParams(
                max_new_tokens=20, do_sample=True, top_p=0.9, top_k=40, seed=7, ignore_eos=True
            )
            first = await collect(engine, [5, 6, 7], seeded)
            noise = [
                collect(engine, list(range(3, 3 + n)), SamplingParams(max_new_tokens=30, do_sample=True))
                for n in (1, 50, 200, 7)
            ]
            crowded, *_ = await asyncio.gather(collect(engine, [5, 6, 7], seeded), *noise)
            async for out in engine.generate(list(range(3, 100)), SamplingParams(max_new_tokens=300)):
                if out.generated_tokens >= 3:
                    break
            for _ in range(100):
                stats = engine.stats()
                if stats.num_free_kv_blocks == stats.num_kv_blocks and stats.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            return first, crowded, engine.stats()

    first, crowded, stats = asyncio.run(main())
    assert first[0] == crowded[0]
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


@pytest.mark.parametrize(
    "case",
    [
        "llama-mha",
        "llama-gqa-llama3-rope",
        # the other block shapes and position schemes, split at attention the same way
        "falcon-40b-grouped-kv-two-norms",
        "opt-350m-post-norm-projections-tied",
        "qwen-v1-fused-c-attn",
    ],
)
def test_piecewise_mixed_graphs_equal_eager_steps(toy_checkpoint, case):
    """Mixed steps replayed from piecewise graphs (every token bucket) give the eager logits."""
    family, overrides = CASES[case]
    path = toy_checkpoint(family, **overrides)
    model_config = ModelConfig.from_pretrained(path)
    runners = {
        graphs: ModelRunner(
            path,
            EngineConfig(
                dtype="float32", device="cuda", num_kv_blocks=400, token_budget=300, cuda_graphs=graphs
            ),
            model_config,
            1024,
        )
        for graphs in (True, False)
    }
    assert runners[True].mixed_graphs is not None and len(runners[True].mixed_graphs.sizes) > 4
    rng = random.Random(1)
    plans, position, next_seq = [], {}, 0
    for step in range(14):
        chunks, started = [], []
        for seq in list(position)[:rng.randint(0, len(position))]:  # some decodes first
            chunks.append(SequenceChunk(seq, [rng.randrange(3, 300)], position[seq], [], True))
            position[seq] += 1
        budget = rng.choice([3, 17, 40, 100, 250])
        seq, next_seq = next_seq, next_seq + 1
        started.append(SequenceStart(seq, GREEDY, 0))
        blocks = list(range(seq * 20, seq * 20 + 20))
        chunks.append(SequenceChunk(seq, [rng.randrange(3, 300) for _ in range(budget)], 0, blocks, True))
        position[seq] = budget
        plans.append(StepPlan(step, [], started, chunks))
    captured = {}
    for graphs, runner in runners.items():
        logits = []
        original = runner.model.compute_logits

        def spy(hidden, original=original, logits=logits):
            result = original(hidden)
            logits.append(result.float().cpu())
            return result

        runner.model.compute_logits = spy
        for plan in plans:
            runner.execute(plan)
        captured[graphs] = logits
    for with_graphs, eager in zip(captured[True], captured[False], strict=True):
        torch.testing.assert_close(with_graphs, eager, rtol=1e-4, atol=1e-4)


def test_decode_graphs_of_every_context_bucket_equal_eager_steps(toy_checkpoint):
    """Decode steps replayed from each context bucket's graph (batch 1 at contexts under 512, under
    2048 and past it, of a 4096-token model; batches of 2 and 3) give the eager steps' logits."""
    family, overrides = CASES["llama-gqa-llama3-rope"]
    path = toy_checkpoint(family, **{**overrides, "max_position_embeddings": 4096})
    rng = random.Random(3)
    prompts = {0: 3000, 1: 1500, 2: 300}  # tokens of each sequence's prompt
    blocks = 4096 // 16
    plans: list[StepPlan] = []
    for seq, length in prompts.items():  # each prompt alone, in chunks of up to 1024 tokens
        for start in range(0, length, 1024):
            tokens = [rng.randrange(3, 300) for _ in range(min(1024, length - start))]
            new_blocks = list(range(seq * blocks, (seq + 1) * blocks)) if start == 0 else []
            chunk = SequenceChunk(seq, tokens, start, new_blocks, start + len(tokens) == length)
            started = [SequenceStart(seq, GREEDY, 0)] if start == 0 else []
            plans.append(StepPlan(len(plans), [], started, [chunk]))
    position = dict(prompts)
    for group in ([2], [1], [0], [2, 1], [2, 1, 0], [0]):  # buckets 512, 2048, 4096, 2048, 4096, 4096
        chunks = [SequenceChunk(seq, [rng.randrange(3, 300)], position[seq], [], True) for seq in group]
        plans.append(StepPlan(len(plans), [], [], chunks))
        for seq in group:
            position[seq] += 1
    logits = {}
    for graphs in (True, False):
        runner = ModelRunner(
            path,
            EngineConfig(dtype="float32", device="cuda", num_kv_blocks=3 * blocks + 8, token_budget=1024,
                         cuda_graphs=graphs),
            ModelConfig.from_pretrained(path),
            4096,
        )
        if graphs:
            assert {(1, 512), (1, 2048), (1, 4096), (4, 512), (4, 4096)} <= set(runner.graphs.graphs)
        seen, sample = [], runner._sample

        def spy(step_logits, states, seen=seen, sample=sample):
            seen.append(step_logits.float().cpu())
            return sample(step_logits, states)

        runner._sample = spy
        for plan in plans:
            runner.execute(plan)
        logits[graphs] = seen
    assert len(logits[True]) == len(plans)
    for step, (with_graphs, eager) in enumerate(zip(logits[True], logits[False], strict=True)):
        torch.testing.assert_close(with_graphs, eager, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_a_step_reports_its_own_device_span(toy_checkpoint):
    """`StepResult.device_us`: positive and within the step's wall time; two steps launched back to
    back each measure their own span (together within the pair's wall time)."""
    family, overrides = CASES["llama-mha"]
    path = toy_checkpoint(family, **overrides)
    runner = ModelRunner(
        path,
        EngineConfig(dtype="float32", device="cuda", num_kv_blocks=64, token_budget=256),
        ModelConfig.from_pretrained(path),
        1024,
    )
    prompt = SequenceChunk(0, list(range(3, 203)), 0, list(range(16)), True)
    began = time.perf_counter()
    first = runner.execute(StepPlan(0, [], [SequenceStart(0, GREEDY, 0)], [prompt]))
    wall = time.perf_counter() - began
    assert 0 < first.device_us <= wall * 1e6
    began = time.perf_counter()
    ahead = runner.launch(StepPlan(1, [], [], [SequenceChunk(0, [5], 200, [], True)]))
    behind = runner.launch(StepPlan(2, [], [], [SequenceChunk(0, [6], 201, [], True)]))
    results = [runner.collect(ahead), runner.collect(behind)]
    wall = time.perf_counter() - began
    assert all(result.device_us > 0 for result in results)
    assert sum(result.device_us for result in results) <= wall * 1e6


def test_runners_leave_the_processs_cuda_generator_as_they_found_it(toy_checkpoint):
    """An embedded engine shares the process's default CUDA generator with its host: building
    runners with and without CUDA graphs and running steps on them draws nothing from it, and
    leaves it usable (a graph capture left open keeps it in capture mode, and every later
    ``torch.randn(device="cuda")`` then raises). Several runners in a row, as the fused-linear
    tests build them in one process, where that was seen."""
    from tests.test_fusions import mixed_plans, step_logits

    family, overrides = CASES["llama-gqa-llama3-rope"]
    path = toy_checkpoint(family, **overrides)
    torch.cuda.manual_seed(1234)
    state = torch.cuda.get_rng_state()
    for cuda_graphs in (True, True, False):
        step_logits(path, mixed_plans(), dtype="bfloat16", device="cuda", cuda_graphs=cuda_graphs,
                    token_budget=64, max_seqs=16)  # fmt: skip
        assert torch.equal(torch.cuda.get_rng_state(), state)
        torch.randn(4, device="cuda")  # raises while the generator is left in capture mode
        torch.cuda.set_rng_state(state)
