"""Log-probabilities recorded by the engine loop equal the pool's own teacher-forced scoring."""

from __future__ import annotations

import math

import pytest

from experts.chat import EncodedPair, answer_logprobs
from experts.types import GenerationRequest
from tests._fixtures.experts import FRANCE, random_lora


@pytest.fixture(scope="module")
def pool(expert_pool):
    expert_pool.add_adapter("alpha", *random_lora(1))
    yield expert_pool
    if "alpha" in expert_pool.experts():
        expert_pool.remove("alpha")


def _scored(pool, expert: str, prompt: list[int], generated: list[int]) -> list[float]:
    """Each generated token's log-prob as the pool's scoring path computes it (one forward pass per
    prefix, no KV cache, float32)."""
    import torch

    key = pool._resolve(expert)[1]
    pad = pool.tokenizer.pad_token_id
    rows = [EncodedPair(input_ids=prompt + generated[: k + 1], answer_len=1) for k in range(len(generated))]
    context, adapters = pool._adapter_context(pool._adapter_names([key] * len(rows)))
    with torch.inference_mode(), pool._lock, context:
        sums, _ = answer_logprobs(pool._shared_model(), rows, pad, adapters)
    return sums.tolist()


@pytest.mark.parametrize("expert", ["base", "alpha"])
def test_generated_logprobs_equal_the_pools_scoring(pool, expert):
    # no repetition penalty: the greedy token is then the model's most likely one
    params = {"max_new_tokens": 10, "repetition_penalty": 1.0}
    request = GenerationRequest(expert=expert, messages=FRANCE, params=params | {"logprobs": 3})
    plain, result = pool.generate([GenerationRequest(expert=expert, messages=FRANCE, params=params), request])
    assert result.text == plain.text and plain.logprobs is None  # recording does not change decoding
    assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
    tokenizer = pool.tokenizer
    generated = _ids(tokenizer, result)
    prompt = pool._prompt(tokenizer, pool._check_request(request))
    expected = _scored(pool, expert, prompt, generated)
    for entry, want in zip(result.logprobs, expected):
        assert abs(entry.logprob - want) < 1e-4, (entry, want)
        assert len(entry.top) == 3 and entry.top[0].token == entry.token  # greedy: the most likely token
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
        assert math.isclose(entry.top[0].logprob, entry.logprob, abs_tol=1e-6)
    assert bytes(b for e in result.logprobs for b in e.bytes).decode("utf-8", "replace").startswith(result.text)


def _ids(tokenizer, result) -> list[int]:
    """The generated token ids, rebuilt from each entry's exact bytes."""
    from experts.decoding import _byte_table

    table = {byte: char for char, byte in _byte_table().items()}
    return [tokenizer.convert_tokens_to_ids("".join(table[b] for b in entry.bytes)) for entry in result.logprobs]


@pytest.mark.parametrize("expert", ["base", "alpha"])
def test_prompt_logprobs_equal_the_pools_scoring(pool, expert):
    """A raw prompt scored in its prefill (beside a row that does not ask) and continued as it is."""
    text = "The capital of France is Paris, and the capital of Italy is"
    scored, other = pool.generate(
        [
            GenerationRequest(
                expert=expert, messages=FRANCE, prompt=text, params={"max_new_tokens": 2, "prompt_logprobs": 2}
            ),
            GenerationRequest(expert=expert, messages=FRANCE, params={"max_new_tokens": 3}),
        ]
    )
    assert other.prompt_logprobs is None
    ids = pool.tokenizer(text, add_special_tokens=False)["input_ids"]
    entries = scored.prompt_logprobs
    assert scored.prompt_tokens == len(ids) == len(entries) and entries[0].logprob is None
    assert "".join(e.token for e in entries) == text
    expected = _scored(pool, expert, ids[:1], ids[1:])
    for entry, want in zip(entries[1:], expected):
        assert abs(entry.logprob - want) < 1e-4, (entry, want)
        assert len(entry.top) == 2 and entry.top[0].logprob >= entry.logprob - 1e-6
    by_ids = pool.generate(
        [
            GenerationRequest(
                expert=expert, messages=FRANCE, prompt=ids, params={"max_new_tokens": 2, "prompt_logprobs": 0}
            )
        ]
    )[0]
    assert [e.logprob for e in by_ids.prompt_logprobs] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    assert by_ids.text == scored.text
