"""The expert pool on the real SmolLM2: mixed-adapter batches, streaming, scoring, errors, registry."""

from __future__ import annotations

import numpy as np
import pytest

from experts.pool import ExpertPool, PoolConfig
from registry.errors import ArtifactError, MoseError, NotFoundError
from tests._fixtures.experts import FRANCE, flat_scores, random_lora, write_full_expert, write_lora_expert


def _req(expert="base", **params):
    return {"expert": expert, "messages": FRANCE, "params": {"max_new_tokens": 8, **params}}


@pytest.fixture(scope="module")
def two_adapters(expert_pool):
    expert_pool.add_adapter("alpha", *random_lora(1))
    expert_pool.add_adapter("beta", *random_lora(2, scale=0.6, modules=("k_proj", "o_proj"), layers=range(10, 30)))
    yield expert_pool
    for name in ("alpha", "beta"):
        if name in expert_pool.experts():
            expert_pool.remove(name)


def test_base_model_generates_a_few_tokens(expert_pool):
    [result] = expert_pool.generate([_req(max_new_tokens=12)])
    assert result.expert == "base" and result.finish_reason == "stop"
    assert "Paris" in result.text and result.prompt_tokens > 10 and 0 < result.completion_tokens <= 12


def test_mixed_adapter_batch_equals_each_request_alone(two_adapters):
    pool = two_adapters
    requests = [_req("alpha"), _req("base"), _req("beta"), _req("alpha", max_new_tokens=4)]
    batched = pool.generate(requests)
    alone = [pool.generate([r])[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
    # the adapters really differ from the base model and from each other
    assert len({batched[0].text, batched[1].text, batched[2].text}) == 3
    # each adapter's rows contiguous: BatchedLoRA adds per-adapter slices instead of per-row stacks
    grouped = [requests[0], requests[3], requests[1], requests[2]]
    assert [r.text for r in pool.generate(grouped)] == [alone[i].text for i in (0, 3, 1, 2)]
    assert batched[3].completion_tokens == 4 and batched[3].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_stops_are_applied(two_adapters):
    pool = two_adapters
    sampled = _req("alpha", temperature=1.2, top_p=0.9, seed=7, max_new_tokens=10)
    assert pool.generate([sampled])[0].text == pool.generate([sampled, _req("beta")])[0].text
    [stopped] = pool.generate([_req(max_new_tokens=12, stop=["Paris"])])
    assert stopped.finish_reason == "stop" and "Paris" not in stopped.text and stopped.text.strip()


def test_streaming_yields_pieces_that_join_to_the_completion(two_adapters):
    pieces = list(two_adapters.stream(_req("beta", max_new_tokens=10)))
    assert len(pieces) > 1
    assert "".join(pieces) == two_adapters.generate([_req("beta", max_new_tokens=10)])[0].text


def test_score_batches_experts_and_matches_single_scoring(two_adapters):
    pool = two_adapters
    scores = pool.score("What is the capital of France?", "Paris is the capital of France.", ["base", "alpha", "beta"])
    assert [s.expert for s in scores] == ["base", "alpha", "beta"]
    for s in scores:
        assert s.logp_given_question < 0 and s.pmi == pytest.approx(s.logp_given_question - s.logp_without_question)
        [alone] = pool.score("What is the capital of France?", "Paris is the capital of France.", [s.expert])
        assert alone.logp_given_question == pytest.approx(s.logp_given_question, abs=1e-4)
        assert alone.logp_without_question == pytest.approx(s.logp_without_question, abs=1e-4)
    assert scores[0].pmi > 0, "the question should make the right answer more likely for the base model"
    assert scores[1].logp_given_question != pytest.approx(scores[0].logp_given_question, abs=1e-3)


def test_answer_token_logprobs_are_the_scored_answer_token_by_token(two_adapters):
    """The per-token log-probs a mixture of experts is computed from add up to what scoring reads."""
    question, answer = "What is the capital of France?", "Paris is the capital of France."
    tokens = two_adapters.answer_token_logprobs([(question, answer), (question, "Lyon.")], ["base", "alpha"])
    for score in two_adapters.score(question, answer, ["base", "alpha"]):
        row = tokens[score.expert][0]
        assert len(row) == score.answer_tokens and all(lp <= 0 for lp in row)
        assert sum(row) / len(row) == pytest.approx(score.logp_given_question, abs=2e-3)
    assert tokens["base"][0] != tokens["alpha"][0] and len(tokens["base"][1]) < len(tokens["base"][0])
    nll = two_adapters.answer_nll_rows([(question, answer)], ["base"])["base"][0]
    assert nll == pytest.approx((-sum(tokens["base"][0]), len(tokens["base"][0])))


def test_scoring_many_items_together_equals_each_alone_and_peft_path(two_adapters):
    pool = two_adapters
    items = [
        ("What is the capital of France?", "Paris.", ["base", "alpha", "beta"]),
        ("Explain photosynthesis briefly.", "Plants turn light, water and CO2 into sugar and oxygen.", ["beta"]),
        ("2 + 2 = ?", "4", ["alpha", "base"]),
    ]
    together = pool.score_many(items)
    pool.config.batched_lora = False  # peft's own adapter_names loop, item by item
    try:
        alone = [pool.score(q, a, e) for q, a, e in items]
    finally:
        pool.config.batched_lora = True
    for many, single in zip(together, alone):
        assert [s.expert for s in many] == [s.expert for s in single]
        for m, o in zip(many, single):
            assert m.logp_given_question == pytest.approx(o.logp_given_question, abs=1e-4)
            assert m.logp_without_question == pytest.approx(o.logp_without_question, abs=1e-4)
            assert m.answer_tokens == o.answer_tokens


def test_shared_trunk_scoring_equals_a_full_pass_per_expert(two_adapters):
    """beta adapts layers 10-29 only: layers 0-9 run once per text, and nothing changes."""
    pool = two_adapters
    keys = [pool._resolve(name)[1] for name in ("base", "beta")]
    scorer = pool._trunk_scorer(keys)
    assert scorer is not None and scorer.first_adapted_layer(keys) == 10
    items = [
        ("What is the capital of France?", "Paris.", ["base", "beta"]),
        (
            "Explain photosynthesis briefly.",
            "Plants turn light, water and CO2 into sugar and oxygen.",
            ["beta", "base"],
        ),
    ]
    shared = pool.score_many(items)
    pool.config.shared_trunk, pool.config.batched_lora = False, False
    try:
        full = pool.score_many(items)
    finally:
        pool.config.shared_trunk, pool.config.batched_lora = True, True
    for row_shared, row_full in zip(shared, full):
        for s, f in zip(row_shared, row_full):
            assert s.expert == f.expert
            assert s.logp_given_question == pytest.approx(f.logp_given_question, abs=1e-4)
            assert s.logp_without_question == pytest.approx(f.logp_without_question, abs=1e-4)
    assert shared[0][0].logp_given_question != pytest.approx(shared[0][1].logp_given_question, abs=1e-3)
    # cached prefixes: the chat template's fixed start (texts with their question) and the whole
    # prompt less its last token (texts without: used when they have a pass to themselves, here
    # a pass of 64 tokens holds one text), each used, and the scores unchanged
    alone = flat_scores(pool, items, score_batch_tokens=64)
    assert alone == [
        pytest.approx([v for s in row for v in (s.logp_given_question, s.logp_without_question)], abs=1e-4)
        for row in full
    ]
    template, unconditional = sorted(scorer.prefixes, key=len)
    assert pool.tokenizer.decode(template).startswith("<|im_start|>system") and len(template) > 20
    assert unconditional[: len(template)] == template
    assert pool.tokenizer.decode(unconditional[len(template) :]).strip().startswith("<|im_end|>")
    assert {len(template), len(unconditional)} == {len(key[0]) for key in scorer._prefixes}


def test_adapters_on_the_answer_only_give_the_same_scores_on_every_path(two_adapters):
    """adapt_question=False: the shared trunk (context through the upper layers once) and a
    full masked pass per expert agree; the scores differ from adapters on the whole text, and the
    base model's do not."""
    pool = two_adapters
    items = [
        ("What is the capital of France?", "Paris.", ["base", "alpha", "beta"]),
        (
            "Explain photosynthesis briefly.",
            "Plants turn light, water and CO2 into sugar and oxygen.",
            ["beta", "base"],
        ),
        ("2 + 2 = ?", "4", ["alpha"]),
    ]
    trunk = flat_scores(pool, items, adapt_question=False)
    plain = flat_scores(pool, items, adapt_question=False, shared_trunk=False)
    alone = [flat_scores(pool, [item], adapt_question=False)[0] for item in items]
    whole = flat_scores(pool, items)
    for row_trunk, row_plain, row_alone in zip(trunk, plain, alone):
        assert row_trunk == pytest.approx(row_plain, abs=1e-4) and row_trunk == pytest.approx(row_alone, abs=1e-4)
    base, alpha = slice(0, 2), 2
    assert trunk[0][base] == pytest.approx(whole[0][base], abs=1e-4)  # no adapter: nothing changes
    assert trunk[0][alpha] != pytest.approx(whole[0][alpha], abs=1e-3)  # alpha reads the question unadapted
    assert trunk[0][alpha] != pytest.approx(trunk[0][0], abs=1e-3)  # and still scores the answer its own way


def test_adapters_cost_only_their_own_size(expert_pool):
    before = expert_pool.memory()
    config, state = random_lora(5)
    expert_pool.add_adapter("gamma", config, state)
    after = expert_pool.memory()
    expert_pool.remove("gamma")
    assert after["adapter_bytes"] - before["adapter_bytes"] == sum(t.numel() * 4 for t in state.values())
    assert after["base_bytes"] == before["base_bytes"]
    assert "gamma" not in expert_pool.experts()


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (_req("nobody"), NotFoundError, "unknown expert 'nobody': this pool serves "),
        (
            _req(max_new_tokens=-3),
            MoseError,
            "invalid generation request: params.max_new_tokens: Input should be greater than or equal to 1 (got -3)",
        ),
        (
            _req(max_new_tokens=65),
            MoseError,
            "invalid generation request: max_new_tokens=65 is above this pool's limit of 64",
        ),
        (
            _req(temperature=-1),
            MoseError,
            "invalid generation request: params.temperature: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            _req(temperature=float("nan")),
            MoseError,
            "invalid generation request: params.temperature: Input should be a finite number (got nan)",
        ),
    ],
)
def test_bad_requests_give_clear_errors_and_leave_the_pool_intact(expert_pool, request_, error, message):
    before = expert_pool.experts()
    with pytest.raises(error) as err:
        expert_pool.generate([_req(), request_])
    assert str(err.value).startswith(message)
    assert expert_pool.experts() == before
    assert expert_pool.generate([_req(max_new_tokens=3)])[0].completion_tokens == 3


def test_pool_serves_active_registry_experts_and_quarantines_tampered_ones(expert_pool, registry, tmp_path):
    for i, name in enumerate(["law-one", "law-two"]):  # law-two gets tampered with below
        record = registry.add(write_lora_expert(tmp_path, name, seed=10 + i), actor="tests")
        registry.activate(record.name, actor="tests")
    pending = registry.add(write_lora_expert(tmp_path, "law-pending", seed=3), actor="tests")
    record = registry.get("law-two")
    blob = registry.blob_paths(record)["adapter_model.safetensors"]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-2] ^= 0x01
    blob.write_bytes(bytes(data))
    try:
        with pytest.raises(ArtifactError, match="law-two@0.1.0: adapter_model.safetensors does not match"):
            expert_pool.add_registered(registry, record)
        assert registry.get("law-two").status == "quarantined"
        assert "law-two" not in expert_pool.experts()
        # loading the registry skips quarantined and pending experts and keeps serving the rest
        assert expert_pool.load_registry(registry) == ["law-one"]
        assert pending.name not in expert_pool.experts()
        [result] = expert_pool.generate([_req("law-one", max_new_tokens=3)])
        assert result.completion_tokens == 3
    finally:
        for name in ("law-one", "law-two"):
            if name in expert_pool.experts():
                expert_pool.remove(name)


def test_full_experts_live_in_a_bounded_lru(base_models, registry, tmp_path):
    import gc
    import weakref

    for i in range(3):
        record = registry.add(write_full_expert(tmp_path, f"full-{i}", seed=i), actor="tests")
        registry.activate(record.name, actor="tests")
    one = (tmp_path / "full-0" / "model.safetensors").stat().st_size
    pool = ExpertPool(PoolConfig(full_expert_budget_bytes=int(2.5 * one), max_new_tokens_limit=8))
    assert sorted(pool.load_registry(registry)) == ["full-0", "full-1", "full-2"]
    results = pool.generate([_req("full-0", max_new_tokens=3), _req("full-1", max_new_tokens=3), _req("base")])
    assert [r.completion_tokens for r in results[:2]] == [3, 3]
    first = weakref.ref(pool._full.peek("full-0").model)
    pool.generate([_req("full-2", max_new_tokens=2)])
    memory = pool.memory()
    assert memory["full_loaded"] == ["full-1", "full-2"] and memory["full_bytes"] <= memory["full_budget_bytes"]
    gc.collect()
    assert first() is None, "the evicted full expert must be freed"
    scores = pool.score("q?", "an answer", ["full-1", "base"])
    assert [s.expert for s in scores] == ["full-1", "base"]


def test_a_tampered_expert_does_not_stop_the_others_from_loading(expert_pool, registry, tmp_path):
    for i, name in enumerate(["med-one", "med-two"]):
        record = registry.add(write_lora_expert(tmp_path, name, seed=20 + i, domain="medicine"), actor="tests")
        registry.activate(record.name, actor="tests")
    # (adapter_config.json is the same blob for both experts: the store is content-addressed)
    blob = registry.blob_paths(registry.get("med-one"))["adapter_model.safetensors"]
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")
    try:
        assert expert_pool.load_registry(registry) == ["med-two"]
        assert "med-one@0.1.0: adapter_model.safetensors does not match" in expert_pool.rejected["med-one"]
        assert registry.get("med-one").status == "quarantined"
        assert registry.audit_verify().ok
    finally:
        if "med-two" in expert_pool.experts():
            expert_pool.remove("med-two")


def test_adapter_with_missing_weights_is_refused_and_the_pool_still_serves(expert_pool):
    config, state = random_lora(9)
    dropped = sorted(state)[0]
    del state[dropped]
    before = expert_pool.experts()
    with pytest.raises(MoseError, match=r"broken: adapter weights do not fit its adapter_config.json"):
        expert_pool.add_adapter("broken", config, state)
    assert expert_pool.experts() == before
    assert expert_pool.generate([_req(max_new_tokens=2)])[0].completion_tokens == 2


def test_batched_lora_decoding_matches_peft_generate(two_adapters):
    """The stacked-matmul path gives the same greedy tokens as peft's own single-adapter generate,
    with a repetition penalty on the prompt and the answer as Hugging Face applies it (and without
    the echo guard, which Hugging Face does not have)."""
    import torch

    from experts.chat import prompt_ids
    from experts.types import DEFAULT_REPETITION_PENALTY

    pool = two_adapters
    ids = torch.tensor([prompt_ids(pool.tokenizer, FRANCE)])
    for name in ("alpha", "beta"):
        pool._peft.set_adapter(pool._adapters[name])
        with torch.inference_mode():
            out = pool._peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                repetition_penalty=DEFAULT_REPETITION_PENALTY,
            )
        reference = pool.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert pool.generate([_req(name, repetition_penalty_prompt=True, echo_guard=False)])[0].text == reference


@pytest.mark.parametrize("adapt_question", [True, False])
@pytest.mark.parametrize("layer", [8, 20])
def test_base_answer_state_is_the_same_from_trunk_branch_and_full_pass(two_adapters, layer, adapt_question):
    """The probe's input, the base model's mean hidden state over the answer: beta adapts layers
    10-29, so layer 8 is read in the shared trunk and layer 20 in the base row of the branch; both
    equal a plain forward pass with output_hidden_states, and only the base model carries one."""
    pool = two_adapters
    items = [
        ("What is the capital of France?", "Paris.", ["beta", "base"]),
        (
            "Explain photosynthesis briefly.",
            "Plants turn light, water and CO2 into sugar and oxygen.",
            ["base", "beta"],
        ),
    ]
    shared = pool.score_many(items, adapt_question, state_layer=layer)
    pool.config.shared_trunk, pool.config.batched_lora = False, False
    try:
        full = pool.score_many(items, adapt_question, state_layer=layer)
    finally:
        pool.config.shared_trunk, pool.config.batched_lora = True, True
    for row_shared, row_full in zip(shared, full):
        for s, f in zip(row_shared, row_full):
            if s.expert != "base":
                assert s.answer_state is None and f.answer_state is None
                continue
            assert len(s.answer_state) == pool._base.config.hidden_size
            assert np.allclose(s.answer_state, f.answer_state, atol=2e-4)
    base_states = [next(s.answer_state for s in row if s.expert == "base") for row in shared]
    assert not np.allclose(base_states[0], base_states[1], atol=1e-2)
    assert all(s.answer_state is None for row in pool.score_many(items, adapt_question) for s in row)
    with pytest.raises(MoseError, match="state_layer 31 is outside the base model's layers \\(0-30\\)"):
        pool.score_many(items, adapt_question, state_layer=31)


@pytest.mark.parametrize("layer", [8, 20])
def test_answer_states_alone_equal_the_base_models_state_from_scoring(two_adapters, layer):
    """The probe's extra rows: pool.answer_states runs only the base model's lower layers, packs
    texts of different lengths into one pass, and gives each the state score_many gives it; without
    the shared trunk it falls back to scoring with the base model."""
    pool = two_adapters
    items = [
        ("What is the capital of France?", "Paris."),
        ("Explain photosynthesis briefly.", "Plants turn light, water and CO2 into sugar and oxygen."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around 1600."),
    ]
    scored = pool.score_many([(q, a, ["beta", "base"]) for q, a in items], True, state_layer=layer)
    alone = pool.answer_states(items, layer)
    assert len(alone) == len(items)
    for row, state in zip(scored, alone):
        assert np.allclose(row[1].answer_state, np.asarray(state), atol=2e-4)
    pool.config.shared_trunk = False
    try:
        assert np.allclose(np.asarray(pool.answer_states(items[:1], layer)[0]), scored[0][1].answer_state, atol=2e-4)
    finally:
        pool.config.shared_trunk = True
    with pytest.raises(MoseError, match="state layer 31 is outside the base model's layers \\(0-30\\)"):
        pool.answer_states(items, 31)
