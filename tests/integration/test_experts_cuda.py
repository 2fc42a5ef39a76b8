"""The pool on CUDA with a 4-bit base (run on a GPU machine; skipped without CUDA)."""

from __future__ import annotations

import pytest

from tests._fixtures.experts import FRANCE, random_lora

pytestmark = pytest.mark.cuda


def test_4bit_base_serves_mixed_adapter_batches_on_cuda(base_models):
    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    pool = ExpertPool(PoolConfig(policy=DevicePolicy(device="cuda", base_quantization="4bit")))
    assert pool.device == "cuda"
    pool.add_adapter("alpha", *random_lora(1))
    pool.add_adapter("beta", *random_lora(2))
    requests = [{"expert": e, "messages": FRANCE, "params": {"max_new_tokens": 8}} for e in ("alpha", "base", "beta")]
    batched = pool.generate(requests)
    assert all(r.completion_tokens > 0 for r in batched)
    # bf16 kernels differ with the batch shape, so exact batch == alone is checked on CPU only.
    scores = pool.score("What is the capital of France?", "Paris.", ["base", "alpha"])
    assert all(s.logp_given_question < 0 for s in scores)
