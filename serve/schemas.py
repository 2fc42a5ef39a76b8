"""HTTP request and response bodies: the OpenAI API subset mose serves, plus its own endpoints.

Requests accept (and ignore) OpenAI fields that do not change the answer (``user``, ``metadata``,
``store``, ...), so the official client works unchanged. Fields that would change it and that mose
does not implement (``tools``, ``response_format`` other than text, ``logit_bias``, ...)
and values it cannot honour (NaN temperature, a seed torch cannot hold, text with unpaired
surrogates) are refused with a 400 that names the field. Responses carry the routing decision in a
``mose`` object.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
"""As OpenAI: each stop string is checked after every generated token."""

MAX_CHOICES = 8
"""Most choices (``n``) one request may ask for."""

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token (``top_logprobs`` for chat, ``logprobs`` for completions), as OpenAI."""

_UNSUPPORTED = {
    # field: (values that mean "not used", why it is refused)
    "tools": ((None, []), "mose does not call tools"),
    "tool_choice": ((None, "none", "auto"), "mose does not call tools"),
    "functions": ((None, []), "mose does not call functions"),
    "function_call": ((None, "none", "auto"), "mose does not call functions"),
    "logit_bias": ((None, {}), "mose does not apply logit_bias"),
    "audio": ((None,), "mose answers with text only"),
    "modalities": ((None, ["text"]), "mose answers with text only"),
    "prediction": ((None,), "mose does not use predicted outputs"),
    "suffix": ((None, ""), "mose does not complete text before a suffix"),
    "web_search_options": ((None,), "mose does not search the web"),
}


def _refuse_unsupported(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    for name, (unused, why) in _UNSUPPORTED.items():
        if name in data and not any(data[name] == value for value in unused):
            raise PydanticCustomError(
                "unsupported_field", "unsupported field {field}: {why}", {"field": name, "why": why}
            )
    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise PydanticCustomError(
            "unsupported_field",
            "unsupported field {field}: mose answers in plain text only (no JSON mode "
            "or JSON schema); send type 'text' or leave it out",
            {"field": "response_format"},
        )
    return data


def _encodable(value: str) -> str:
    # JSON may carry "\ud800" (an unpaired surrogate): Python accepts it, tokenizers do not.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unpaired_surrogate",
            "text holds an unpaired UTF-16 surrogate at position {pos}, which is not a character",
            {"pos": exc.start},
        ) from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]
"""A string that is valid Unicode text (no unpaired surrogates)."""


class _Request(BaseModel):
    # extra="ignore": clients send OpenAI fields that do not change the answer (user, store, ...).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, use_attribute_docstrings=True)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk (before ``[DONE]``) whose ``usage`` covers the whole request, with no choices."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    """Who said it."""

    content: Text
    """The message text."""


class SamplingFields(_Request):
    """Sampling fields shared by chat and text completions (OpenAI names and meanings)."""

    max_tokens: int | None = None
    """Most tokens to generate (server default when absent; bounded by the server's limit)."""

    max_completion_tokens: int | None = None
    """Newer OpenAI name for ``max_tokens``; wins when both are given."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """0 is greedy decoding; higher is more random."""

    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling mass."""

    stop: str | list[str] | None = None
    """Stop generating when one of these strings appears (not included in the output); at most 4."""

    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    """Seed for reproducible sampling (a 64-bit signed integer)."""

    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    """Lowers the logit of every token the answer already holds by this much (OpenAI's meaning)."""

    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    """Lowers a token's logit by this much per time the answer already holds it (OpenAI's meaning)."""

    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    """As vLLM's extension, but on the answer's tokens only: divides the positive logits of tokens
    the answer already holds (1 = off; absent: the server's default, 1.1)."""

    echo_guard: bool | None = None
    """mose's extension: hold end-of-turn while the answer only restates the question (absent: the
    server's default, on; ``false`` lets the expert end whenever it likes)."""

    stream: bool = False
    """Send the answer as server-sent events, token by token."""

    stream_options: StreamOptions | None = None
    """Options of a streamed answer (only with ``stream``)."""

    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Number of choices, each decoded as its own row (identical at temperature 0)."""

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        return _refuse_unsupported(data)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError(
                "too_many_stops",
                "at most {limit} stop sequences (got {count})",
                {"limit": MAX_STOP_SEQUENCES, "count": len(value)},
            )
        for item in [value] if isinstance(value, str) else value or []:
            if not item:
                raise PydanticCustomError("empty_stop", "stop sequences must not be empty")
            _encodable(item)
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    model: Text = "auto"
    """``auto`` (the router picks), an expert name, or ``upstream:<name>``."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation; the last user message is what gets routed."""

    logprobs: bool | None = None
    """Return the log-probability of each generated token (``choices[].logprobs.content``)."""

    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """With ``logprobs``: also the most likely alternatives at each position, this many."""

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError(
                "top_logprobs_without_logprobs", "top_logprobs needs logprobs: true", {"field": "top_logprobs"}
            )
        return self

    def logprob_alternatives(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def routing_text(self) -> str:
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].content

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class CompletionRequest(SamplingFields):
    model: Text = "auto"
    """``auto`` (the router picks), an expert name, or ``upstream:<name>``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """The prompt: text, or token ids (continued as they are; needs a named ``model``); a list of
    prompts must hold exactly one."""

    echo: bool = False
    """Return the prompt before the completion. The prompt is then continued as raw text (no chat
    template); with ``logprobs`` its tokens are scored too (the first has no log-probability), and
    ``max_tokens: 0`` only scores it."""

    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return each token's log-probability and this many most likely alternatives (the legacy
    ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset`` object)."""

    best_of: int | None = None
    """Accepted when equal to ``n`` (or 1): every choice is returned."""

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of not in (None, 1, self.n):
            raise PydanticCustomError(
                "unsupported_field",
                "unsupported field {field}: mose returns every choice; send best_of equal to n or leave it out",
                {"field": "best_of"},
            )
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        if isinstance(value, list) and value and all(isinstance(token, int) for token in value):
            return value
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("mose answers one prompt per request; send a string, token ids or a one-item list")
        one = value if isinstance(value, str) else value[0]
        if isinstance(one, list) and not one:
            raise ValueError("the prompt's token ids are empty")
        if isinstance(one, str):
            _encodable(one)
        return value

    def prompt_ids(self) -> list[int] | None:
        """The prompt's token ids, when it was sent as token ids."""
        one = (
            self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)) else self.prompt
        )
        return list(one) if isinstance(one, list) else None

    def prompt_text(self) -> str:
        """The prompt's text ('' for token ids)."""
        one = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return one if isinstance(one, str) else ""


class Alternative(_Strict):
    domain: str
    """A candidate domain."""

    expert: str
    """The expert that serves it."""

    p: float
    """Calibrated probability of that domain."""


class MoseInfo(_Strict):
    """The routing decision (and the verdict, for upstream answers) attached to a response."""

    expert: str
    """The expert that answered."""

    domain: str | None = None
    """The domain the router chose (None when the caller named the expert)."""

    confidence: float | None = None
    """Calibrated probability of that domain."""

    abstained: bool = False
    """True when the router was not confident and the fallback answered."""

    alternatives: list[Alternative] = Field(default_factory=list)
    """The router's other top candidates."""

    verdict: dict[str, Any] | None = None
    """The jury's verdict on an upstream answer."""


class Usage(_Strict):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatTopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]
    """The most likely tokens at this position, most likely first (``top_logprobs`` of them)."""


class ChatLogprobs(_Strict):
    content: list[ChatTokenLogprob]
    """One entry per generated token."""


class CompletionLogprobs(_Strict):
    """The completions endpoint's (legacy) log-probability object: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
    """Each token's character offset in the choice's text."""


class ChatChoice(_Strict):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: ChatLogprobs | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletion(_Strict):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(default_factory=Usage)
    mose: MoseInfo


class TextChoice(_Strict):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: CompletionLogprobs | None = None


class Completion(_Strict):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TextChoice]
    usage: Usage = Field(default_factory=Usage)
    mose: MoseInfo


class RouteRequest(_Request):
    query: Text = Field(min_length=1)
    """The text to route."""


class CrosscheckRequest(_Request):
    question: Text = Field(min_length=1)
    """The question the large model was asked."""

    answer: Text
    """The large model's answer to check."""

    k: int = Field(3, ge=1, le=16)
    """How many experts sit on the jury (besides the base model)."""

    own_answers: bool = False
    """Also let jurors answer and compare (slower)."""


class FeedbackRequest(_Request):
    verdict_id: Text = Field(min_length=1)
    """The ``id`` of a verdict returned earlier."""

    correct: bool
    """Whether the checked answer was in fact correct."""


class ErrorBody(_Strict):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Strict):
    """OpenAI's error shape, so clients surface the message."""

    error: ErrorBody


class FeedbackResponse(_Strict):
    verdict_id: str
    correct: bool
    weights: dict[str, float]
    """Each juror's reliability weight after this feedback."""


class ModelCard(_Strict):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    created: int = 0
    mose: dict[str, Any] | None = None
    """For experts: name, version, kind, domains, owner, description (verbatim from the manifest)."""


class ModelList(_Strict):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RouterUpdateOut(_Strict):
    """The router step of an activation (:mod:`serve.activation`)."""

    version: str | None = None
    """The live router version afterwards."""
    previous: str | None = None
    """The version the update started from."""
    added_domains: list[str] = Field(default_factory=list)
    """Domains the router learned (empty: it already routed the expert's domain)."""
    example_queries: int = 0
    """Example queries the new head rows were fitted on."""
    seconds: float = 0.0
    """Wall time of the update."""
    error: str | None = None
    """Why the router could not be updated (the expert is active all the same)."""


class ExpertRecordOut(_Strict):
    """A registered expert, as the admin endpoints return it."""

    name: str
    version: str
    status: str
    kind: str
    domains: list[str]
    base_model: str | None = None
    router: RouterUpdateOut | None = None
    """After an activation: what the router learned (None for other actions, or with no router yet)."""


class Health(BaseModel):
    """``status`` plus what each part runs on (router version and provider, pools, calibrator)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]
