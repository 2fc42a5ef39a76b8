"""Generation parameters: every bad value gives one clear MoseError naming the field."""

from __future__ import annotations

import pytest

from experts.types import GenerationRequest, SamplingParams, validate
from registry.errors import MoseError

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": -5}, "params.max_new_tokens: Input should be greater than or equal to 1 (got -5)"),
        ({"max_new_tokens": 0}, "params.max_new_tokens: Input should be greater than or equal to 1 (got 0)"),
        ({"temperature": -0.5}, "params.temperature: Input should be greater than or equal to 0 (got -0.5)"),
        ({"temperature": float("nan")}, "params.temperature: Input should be a finite number (got nan)"),
        ({"top_p": 0}, "params.top_p: Input should be greater than 0 (got 0)"),
        ({"top_p": 1.5}, "params.top_p: Input should be less than or equal to 1 (got 1.5)"),
        ({"stop": [""]}, "params.stop: Value error, stop strings must not be empty"),
        ({"beam": 3}, "params.beam: Extra inputs are not permitted (got 3)"),
    ],
)
def test_bad_sampling_params_are_refused_with_the_field_named(params, message):
    with pytest.raises(MoseError) as err:
        validate(GenerationRequest, {"messages": MSG, "params": params}, "generation request")
    assert str(err.value) == f"invalid generation request: {message}"


def test_messages_are_required():
    with pytest.raises(MoseError, match=r"invalid generation request: messages: List should have at least 1 item"):
        validate(GenerationRequest, {"expert": "base", "messages": []}, "generation request")


def test_defaults_are_greedy_and_bounded():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.max_new_tokens, params.stop, params.seed) == (
        0.0,
        1.0,
        64,
        [],
        None,
    )


def test_a_vanishing_temperature_decodes_greedily_instead_of_sampling_nan():
    import torch

    from experts.decoding import _generator, _sample
    from experts.types import SamplingParams

    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert torch.isnan(torch.softmax(logits / 1e-300, dim=-1)).any()  # what the guard avoids
    for temperature in (1e-300, 1e-4):
        assert _sample(logits, SamplingParams(temperature=temperature), _generator(0)) == 1
