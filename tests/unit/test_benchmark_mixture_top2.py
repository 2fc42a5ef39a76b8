"""The top-2 mixture row of benchmarks/mixture.py: which experts are mixed, with which weights, and
the per-token mixture's NLL."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from mixture import mixed_nll, top_two  # noqa: E402

from router_model.runtime import DomainScore, RouteDecision  # noqa: E402


def _decision(*alternatives, abstained=False):
    top = [DomainScore(domain=d, expert=e, p=p) for d, e, p in alternatives]
    return RouteDecision(
        domain=top[0].domain, expert=top[0].expert, confidence=top[0].p, top_k=top, abstained=abstained
    )


def test_the_two_likeliest_servable_experts_are_mixed_by_renormalised_probability():
    decision = _decision(("law", "demo-law", 0.6), ("finance", "demo-finance", 0.2), ("math", "demo-math", 0.1))
    assert top_two(decision, {"demo-law", "demo-finance", "demo-math"}, "demo-law") == [
        ("demo-law", pytest.approx(0.75)),
        ("demo-finance", pytest.approx(0.25)),
    ]
    # an expert that is not served is skipped; two domains served by one expert count once
    assert top_two(decision, {"demo-law", "demo-math"}, "demo-law")[1][0] == "demo-math"
    same = _decision(("law", "demo-law", 0.6), ("tax", "demo-law", 0.3))
    assert top_two(same, {"demo-law"}, "demo-law") == [("demo-law", 1.0)]
    assert top_two(_decision(("law", "base", 0.3), abstained=True), {"base"}, "base") == [("base", 1.0)]


def test_mixture_nll_is_one_expert_s_alone_and_between_the_best_and_the_average_for_two():
    a, b = [-0.1, -2.0, -0.5], [-1.5, -0.2, -0.4]
    assert mixed_nll([a], [1.0]) == (pytest.approx(-sum(a)), 3)
    total, tokens = mixed_nll([a, b], [0.5, 0.5])
    per_token_best = -sum(max(x, y) for x, y in zip(a, b))
    assert tokens == 3 and per_token_best < total < 0.5 * (-sum(a)) + 0.5 * (-sum(b))
    assert total == pytest.approx(-sum(math.log(0.5 * math.exp(x) + 0.5 * math.exp(y)) for x, y in zip(a, b)))
