"""The full-expert LRU stays within its byte budget and really frees evicted models."""

from __future__ import annotations

import gc
import weakref

import pytest

from experts.pool import FullExpertLRU, _FullEntry, model_bytes
from registry.errors import MoseError


def _tiny_model(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_eviction_bounds_memory_and_frees_the_model():
    size = model_bytes(_tiny_model(0))
    lru = FullExpertLRU(budget_bytes=2 * size + size // 2)  # room for two
    refs = {}
    for i, name in enumerate(["a", "b", "c"]):
        model = _tiny_model(i)
        refs[name] = weakref.ref(model)
        lru.put(name, _FullEntry(model=model, tokenizer=None, nbytes=model_bytes(model)))
        del model
        assert lru.used_bytes <= lru.budget_bytes
    assert lru.names() == ["b", "c"]
    gc.collect()
    assert refs["a"]() is None, "an evicted model must not stay in memory"
    assert refs["b"]() is not None


def test_get_refreshes_recency():
    size = model_bytes(_tiny_model(0))
    lru = FullExpertLRU(budget_bytes=2 * size)
    for i, name in enumerate(["a", "b"]):
        lru.put(name, _FullEntry(model=_tiny_model(i), tokenizer=None, nbytes=size))
    assert lru.get("a") is not None
    lru.put("c", _FullEntry(model=_tiny_model(2), tokenizer=None, nbytes=size))
    assert lru.names() == ["a", "c"]


def test_expert_larger_than_the_budget_is_refused_and_nothing_is_evicted():
    size = model_bytes(_tiny_model(0))
    lru = FullExpertLRU(budget_bytes=size)
    lru.put("a", _FullEntry(model=_tiny_model(0), tokenizer=None, nbytes=size))
    with pytest.raises(
        MoseError, match=r"does not fit the full-expert memory budget .* raise PoolConfig.full_expert_budget_bytes"
    ):
        lru.make_room(size * 3)
    assert lru.names() == ["a"]
