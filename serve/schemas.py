"""HTTP request and response bodies: the OpenAI API subset mose serves, plus its own endpoints.

Requests accept (and ignore) OpenAI fields mose does not use, so the official client works
unchanged; values mose cannot honour (``n > 1``, NaN temperature) are refused with a 400 that
names the field. Responses carry the routing decision in a ``mose`` object.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    # extra="ignore": clients send OpenAI fields we do not use (logprobs, user, ...).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, use_attribute_docstrings=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    """Who said it."""

    content: str
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
    """Stop generating when one of these strings appears (not included in the output)."""

    seed: int | None = None
    """Seed for reproducible sampling."""

    stream: bool = False
    """Send the answer as server-sent events, token by token."""

    n: Literal[1] = 1
    """Number of choices; mose returns one."""

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    model: str = "auto"
    """``auto`` (the router picks), an expert name, or ``upstream:<name>``."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation; the last user message is what gets routed."""

    def routing_text(self) -> str:
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].content

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class CompletionRequest(SamplingFields):
    model: str = "auto"
    """``auto`` (the router picks), an expert name, or ``upstream:<name>``."""

    prompt: str | list[str]
    """The prompt (a list must hold exactly one string)."""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("mose answers one prompt per request; send a string or a one-item list")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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


class ChatChoice(_Strict):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"] = "stop"


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
    logprobs: None = None


class Completion(_Strict):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TextChoice]
    usage: Usage = Field(default_factory=Usage)
    mose: MoseInfo


class RouteRequest(_Request):
    query: str = Field(min_length=1)
    """The text to route."""


class CrosscheckRequest(_Request):
    question: str = Field(min_length=1)
    """The question the large model was asked."""

    answer: str
    """The large model's answer to check."""

    k: int = Field(3, ge=1, le=16)
    """How many experts sit on the jury (besides the base model)."""

    own_answers: bool = False
    """Also let jurors answer and compare (slower)."""


class FeedbackRequest(_Request):
    verdict_id: str = Field(min_length=1)
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
