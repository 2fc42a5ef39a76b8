"""Request and result types of the expert pool (plain pydantic: they cross process boundaries)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry.errors import MoseError

BASE_EXPERT = "base"
"""Name that addresses the base model itself (its id, e.g. ``smollm2-135m-instruct``, works too)."""


DEFAULT_REPETITION_PENALTY = 1.1
"""Greedy answers of the 135M demo experts loop (a sentence or a list item again and again) on
about one question in eight without a penalty; 1.1 on the answer's own tokens removes the loops
and keeps answers as close to the reference (docs/decisions/repetition-penalty.md)."""


OpenAIPenalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
"""A presence or frequency penalty, in OpenAI's range."""


class SamplingParams(BaseModel):
    """How to sample one completion."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=64, ge=1, description="Most tokens to generate (the pool caps it).")
    temperature: float = Field(
        default=0.0, ge=0.0, allow_inf_nan=False, description="0 = greedy; higher = more random."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass, in (0, 1]."
    )
    stop: list[str] = Field(
        default_factory=list, max_length=8, description="Strings that end the completion (not included in the text)."
    )
    seed: int | None = Field(default=None, description="Seed for sampling; same seed, same completion.")
    repetition_penalty: float = Field(
        default=DEFAULT_REPETITION_PENALTY,
        gt=0.0,
        le=2.0,
        allow_inf_nan=False,
        description=(
            "Divides the positive logits (multiplies the negative ones) of every token the answer "
            "already holds; 1 = off. The default keeps the small experts' greedy answers from looping "
            "(docs/decisions/repetition-penalty.md)."
        ),
    )
    repetition_penalty_prompt: bool = Field(
        default=False,
        description=(
            "Apply the repetition penalty to the prompt's tokens too, as vLLM and Hugging Face do "
            "(off by default: it pushes answers away from the question's own terms)."
        ),
    )
    presence_penalty: OpenAIPenalty = Field(
        default=0.0,
        description="Subtracted once from the logit of every token the answer already holds (OpenAI's meaning).",
    )
    frequency_penalty: OpenAIPenalty = Field(
        default=0.0,
        description="Subtracted from a token's logit once per time the answer already holds it (OpenAI's meaning).",
    )
    echo_guard: bool = Field(
        default=True,
        description=(
            "Hold end-of-turn while the answer only restates the question (no meaningful word the "
            "last user message lacks yet). Small experts trained on short answers otherwise end on an "
            "echo of a question they cannot answer (docs/decisions/echo-guard.md). Requests that "
            "continue a raw ``prompt`` have no question and are not held."
        ),
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description=(
            "Record each generated token's log-probability and this many most likely alternatives "
            "(None: record nothing)."
        ),
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description=(
            "Also score the prompt: each prompt token's log-probability given the tokens before it and "
            "this many most likely alternatives (None: do not score the prompt)."
        ),
    )

    @property
    def penalised(self) -> bool:
        """True when any repetition, presence or frequency penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(default="user", description="Who speaks.")
    content: str = Field(default="", description="What is said.")


class GenerationRequest(BaseModel):
    """One completion request: which expert, the conversation, and how to sample."""

    model_config = ConfigDict(extra="forbid")

    expert: str = Field(default=BASE_EXPERT, description="Expert name, or 'base' for the base model.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    params: SamplingParams = Field(default_factory=SamplingParams, description="Sampling parameters.")
    prompt: str | list[int] | None = Field(
        None, description=("Text or token ids to continue as they are, instead of the chat-formatted ``messages``.")
    )

    @property
    def question(self) -> str:
        """The last user message: what the answer must not merely restate (empty when the
        request continues a raw ``prompt``)."""
        if self.prompt is not None:
            return ""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


class TopLogprob(BaseModel):
    """One candidate token at a position and its log-probability."""

    token: str = Field(description="The token's text.")
    logprob: float | None = Field(
        description=(
            "Natural-log probability under the model (float32 log-softmax of the logits); None for the "
            "prompt's first token, which nothing predicts."
        )
    )
    bytes: list[int] = Field(description="The token's UTF-8 bytes (a token can hold part of a character).")


class TokenLogprob(TopLogprob):
    """A generated token, its log-probability and the most likely alternatives at its position."""

    top: list[TopLogprob] = Field(default_factory=list, description="Most likely tokens, most likely first.")


class GenerationResult(BaseModel):
    """One completion."""

    expert: str = Field(description="Expert that answered.")
    text: str = Field(description="Generated text (stop string and end-of-turn removed).")
    finish_reason: Literal["stop", "length"] = Field(description="'stop': end of turn or stop string.")
    prompt_tokens: int = Field(description="Tokens in the formatted prompt.")
    completion_tokens: int = Field(description="Tokens generated.")
    logprobs: list[TokenLogprob] | None = Field(
        None, description=("With ``params.logprobs``: one entry per generated token (end-of-turn excluded).")
    )
    prompt_logprobs: list[TokenLogprob] | None = Field(
        None,
        description=("With ``params.prompt_logprobs``: one entry per prompt token (the first has no log-probability)."),
    )


class ExpertScore(BaseModel):
    """Likelihood evidence of one expert about one answer."""

    expert: str = Field(description="Expert name ('base' for the base model).")
    logp_given_question: float = Field(description="Mean log-prob of the answer tokens given the question.")
    logp_without_question: float = Field(description="Mean log-prob of the answer tokens without it.")
    pmi: float = Field(description="logp_given_question - logp_without_question.")
    answer_tokens: int = Field(description="Answer tokens scored (after truncation).")
    answer_state: list[float] | None = Field(
        None,
        repr=False,
        description=(
            "Base model only, when asked (``state_layer``): its mean hidden state over the positions "
            "that predict the answer, given the question; the jury's truthfulness probe reads it."
        ),
    )


def validate(model: type[BaseModel], data: object, what: str) -> BaseModel:
    """Validate ``data`` as ``model``; pydantic errors become one clear MoseError."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}"
            + (f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else "")
            for err in exc.errors()
        )
        raise MoseError(f"invalid {what}: {problems}") from None
