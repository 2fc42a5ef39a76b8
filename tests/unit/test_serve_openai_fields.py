"""OpenAI request fields on the real FastAPI app with a fake pool: ``n``, ``logprobs`` and
``top_logprobs``, ``stream_options.include_usage``, and a 400 naming each field mose does not
support; exercised with the official ``openai`` client and LangChain's ``ChatOpenAI``."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from experts.types import GenerationResult, TokenLogprob, TopLogprob
from serve.backend import Backend
from serve.config import ServeConfig

TOKENS = [("Paris", -0.25), (" is", -0.5), (" nice", -1.5)]
PROMPT = [(101, "The", None), (102, " capital", -3.0), (103, " of", -0.75), (104, " France", -1.25), (105, " is", -0.5)]
"""A raw prompt the fake pool scores: (token id, text, log-prob given the tokens before)."""


def _entry(token: str, logprob: float, k: int) -> TokenLogprob:
    top = [TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))]
    top += [TopLogprob(token=f"alt{i}", logprob=logprob - 1 - i, bytes=list(f"alt{i}".encode())) for i in range(k - 1)]
    return TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top=top[:k])


class FakePool(Backend):
    """Answers every request with "Paris is nice" (three tokens, finish reason ``length``)."""

    def __init__(self) -> None:
        self.requests = []

    def _result(self, request) -> GenerationResult:
        self.requests.append(request)
        k, scored = request.params.logprobs, request.params.prompt_logprobs
        prompt = None
        if scored is not None:
            assert request.prompt in ("".join(t for _, t, _ in PROMPT), [i for i, _, _ in PROMPT])
            prompt = [
                _entry(t, lp, scored) if lp is not None else TokenLogprob(token=t, logprob=None, bytes=[])
                for _, t, lp in PROMPT
            ]
        tokens = TOKENS[: request.params.max_new_tokens]
        return GenerationResult(
            expert=request.expert,
            text="".join(t for t, _ in tokens),
            finish_reason="length",
            prompt_tokens=len(PROMPT) if scored is not None else 7,
            completion_tokens=len(tokens),
            logprobs=None if k is None else [_entry(t, lp, k) for t, lp in tokens],
            prompt_logprobs=prompt,
        )

    async def generate(self, request):
        return self._result(request), 1

    async def stream(self, request):
        for token, _ in TOKENS:
            yield token
        yield self._result(request)

    async def route(self, query):
        raise NotImplementedError

    async def crosscheck(self, question, answer, k, own_answers):
        raise NotImplementedError

    async def feedback(self, verdict_id, correct):
        raise NotImplementedError

    async def upstream_chat(self, name, messages, max_tokens, temperature):
        raise NotImplementedError

    async def experts(self):
        return [{"name": "med", "version": "1.0.0", "domains": ["medicine"], "owner": "t", "kind": "lora"}]

    async def authenticate_team(self, token):
        raise NotImplementedError

    async def register(self, manifest, files, actor):
        raise NotImplementedError

    async def set_status(self, name, action, actor, reason=None):
        raise NotImplementedError

    async def health(self):
        return {}


@pytest.fixture
def pool():
    return FakePool()


@pytest.fixture
def http(pool):
    from serve.api import build_api

    return TestClient(build_api(ServeConfig(), pool), raise_server_exceptions=False)


@pytest.fixture
def client(http):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


CHAT = {"model": "med", "messages": [{"role": "user", "content": "Capital of France?"}]}
TEXT = {"model": "med", "prompt": "The capital of France is"}


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"50256": -100}),
        ("modalities", ["text", "audio"]),
    ],
)
def test_a_field_mose_does_not_support_is_refused_by_name(http, pool, field, value):
    response = http.post("/v1/chat/completions", json=CHAT | {field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"] and error["param"] == field
    assert pool.requests == []


@pytest.mark.parametrize("field, value", [("suffix", " end"), ("best_of", 3)])
def test_completion_fields_mose_does_not_support_are_refused_by_name(http, field, value):
    response = http.post("/v1/completions", json=TEXT | {field: value})
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"] and response.json()["error"]["param"] == field


def test_fields_that_do_not_change_the_answer_are_accepted(http):
    neutral = {
        "user": "u1",
        "store": False,
        "metadata": {"a": "b"},
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "tool_choice": "none",
        "parallel_tool_calls": True,
    }
    assert http.post("/v1/chat/completions", json=CHAT | neutral).status_code == 200
    assert http.post("/v1/completions", json=TEXT | {"echo": False, "best_of": 1, "suffix": None}).status_code == 200


def test_penalties_reach_the_pool_and_the_repetition_penalty_has_a_server_default(client, http, pool):
    from experts.types import DEFAULT_REPETITION_PENALTY

    client.chat.completions.create(**CHAT, presence_penalty=0.5, frequency_penalty=-1.0)
    params = pool.requests[-1].params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.repetition_penalty == DEFAULT_REPETITION_PENALTY
    client.chat.completions.create(**CHAT, extra_body={"repetition_penalty": 1.0})  # vLLM's extension: off
    assert pool.requests[-1].params.repetition_penalty == 1.0 and not pool.requests[-1].params.penalised
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0)):
        response = http.post("/v1/chat/completions", json=CHAT | {field: value})
        assert response.status_code == 400 and field in response.json()["error"]["message"], response.text


def test_the_echo_guard_is_on_by_default_and_a_request_can_switch_it_off(client, http, pool):
    client.chat.completions.create(**CHAT)
    assert pool.requests[-1].params.echo_guard is True
    client.chat.completions.create(**CHAT, extra_body={"echo_guard": False})
    assert pool.requests[-1].params.echo_guard is False
    response = http.post("/v1/chat/completions", json=CHAT | {"echo_guard": "sometimes"})
    assert response.status_code == 400 and "echo_guard" in response.json()["error"]["message"], response.text


def test_n_choices_are_n_rows_each_with_its_own_seed(client, pool):
    reply = client.chat.completions.create(**CHAT, n=3, seed=41, temperature=0.7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == "Paris is nice" and c.finish_reason == "length" for c in reply.choices)
    assert [r.params.seed for r in pool.requests] == [41, 42, 43]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (7, 9, 16)
    text = client.completions.create(**TEXT, n=2)
    assert [c.index for c in text.choices] == [0, 1] and pool.requests[-1].params.seed is None


def test_n_is_bounded(http):
    response = http.post("/v1/chat/completions", json=CHAT | {"n": 99})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_chat_logprobs_and_top_logprobs(client, pool):
    reply = client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=2)
    assert pool.requests[-1].params.logprobs == 2
    content = reply.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in content] == TOKENS
    assert content[0].bytes == list(b"Paris")
    assert [t.token for t in content[0].top_logprobs] == ["Paris", "alt0"]
    plain = client.chat.completions.create(**CHAT, logprobs=True)
    assert pool.requests[-1].params.logprobs == 0 and plain.choices[0].logprobs.content[1].top_logprobs == []
    without = client.chat.completions.create(**CHAT)
    assert pool.requests[-1].params.logprobs is None and without.choices[0].logprobs is None


def test_top_logprobs_needs_logprobs(http):
    response = http.post("/v1/chat/completions", json=CHAT | {"top_logprobs": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


def test_completion_logprobs_in_the_legacy_format(client, pool):
    reply = client.completions.create(**TEXT, logprobs=2, max_tokens=3)
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == ["Paris", " is", " nice"]
    assert logprobs.token_logprobs == [-0.25, -0.5, -1.5]
    assert logprobs.text_offset == [0, 5, 8]
    assert logprobs.top_logprobs[0] == {"Paris": -0.25, "alt0": -1.25}


def test_logprobs_are_refused_when_streaming(http):
    response = http.post("/v1/chat/completions", json=CHAT | {"stream": True, "logprobs": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_stream_options_need_stream(http):
    response = http.post("/v1/chat/completions", json=CHAT | {"stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_include_usage_sends_a_last_chunk_with_the_usage(client, endpoint):
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(**TEXT, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "Paris is nice"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.total_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_without_include_usage_no_usage_chunk(http):
    with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == "data: [DONE]" and all("usage" not in b and b["choices"] for b in bodies)


def test_streamed_n_choices_interleave_and_each_finishes(client):
    chunks = list(client.chat.completions.create(**CHAT, n=2, stream=True, stream_options={"include_usage": True}))
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Paris is nice", 1: "Paris is nice"} and finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 7


def test_langchain_chat_openai_gets_logprobs(http):
    langchain_openai = pytest.importorskip("langchain_openai")

    chat = langchain_openai.ChatOpenAI(
        model="med",
        base_url="http://testserver/v1",
        api_key="unused",
        http_client=http,
        max_retries=0,
        logprobs=True,
        top_logprobs=2,
    )
    message = chat.invoke("Capital of France?")
    assert message.content == "Paris is nice"
    content = message.response_metadata["logprobs"]["content"]
    assert [(e["token"], e["logprob"]) for e in content] == TOKENS
    assert len(content[0]["top_logprobs"]) == 2
    assert message.response_metadata["finish_reason"] == "length"


LM_EVAL_LOGLIKELIHOOD = {
    "model": "med",
    "prompt": [[101, 102, 103, 104, 105]],
    "temperature": 0,
    "max_tokens": 1,
    "logprobs": 1,
    "seed": 1234,
    "echo": True,
}
"""What lm-eval-harness's ``local-completions`` sends for one loglikelihood request (token ids,
one prompt in a list); it then reads ``token_logprobs[ctxlen:-1]`` and the ``top_logprobs`` beside
them to tell whether the continuation is greedy."""


def test_lm_eval_loglikelihood_request(http, pool):
    response = http.post("/v1/completions", json=LM_EVAL_LOGLIKELIHOOD)
    assert response.status_code == 200, response.text
    assert pool.requests[-1].prompt == [101, 102, 103, 104, 105]
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == "The capital of France isParis"
    assert logprobs["tokens"] == ["The", " capital", " of", " France", " is", "Paris"]
    assert logprobs["token_logprobs"] == [None, -3.0, -0.75, -1.25, -0.5, -0.25]
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {" capital": -3.0}
    assert logprobs["text_offset"] == [0, 3, 11, 14, 21, 24]
    ctxlen = 3  # as lm-eval scores a continuation: its tokens after the context, less the decoded one
    continuation = logprobs["token_logprobs"][ctxlen:-1]
    assert sum(continuation) == -1.75
    greedy = all(value == max(top.values()) for value, top in zip(continuation, logprobs["top_logprobs"][ctxlen:-1]))
    assert greedy


def test_echo_with_max_tokens_0_only_scores_the_prompt(client, pool):
    reply = client.completions.create(
        model="med", prompt="The capital of France is", max_tokens=0, echo=True, logprobs=0
    )
    choice = reply.choices[0]
    assert pool.requests[-1].prompt == "The capital of France is" and pool.requests[-1].params.max_new_tokens == 1
    assert choice.text == "The capital of France is" and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.tokens == [t for _, t, _ in PROMPT] and reply.usage.completion_tokens == 0
    echoed = client.completions.create(model="med", prompt="The capital of France is", max_tokens=3, echo=True)
    assert echoed.choices[0].text == "The capital of France isParis is nice" and echoed.choices[0].logprobs is None


def test_token_id_prompts_need_a_named_model(http):
    response = http.post("/v1/completions", json=LM_EVAL_LOGLIKELIHOOD | {"model": "auto"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


def test_echo_is_refused_when_streaming(http):
    response = http.post("/v1/completions", json=TEXT | {"echo": True, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"
