"""How a vertical's token budget is split between the shared seed and its own expert."""

import pytest

from experts.demo import DemoConfig, budget_split
from experts.lora_training import take_tokens


class _Row:
    def __init__(self, n: int) -> None:
        self.input_ids = list(range(n))


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("budget", [None, 1, 50, 333, 10_000])
def test_seed_and_branch_rows_are_the_rows_one_expert_would_take(share: float, budget: int | None) -> None:
    lengths = [17, 40, 3, 88, 25, 61, 9, 30, 45, 12] * 3
    seed_end, branch_end = budget_split(lengths, budget, share)
    alone = take_tokens([_Row(n) for n in lengths], budget)
    assert 0 <= seed_end <= branch_end == len(alone)  # disjoint, together exactly the solo rows
    assert seed_end < branch_end  # the expert always has rows of its own


def test_the_seed_takes_about_its_share_of_the_tokens() -> None:
    lengths = [10] * 100
    seed_end, branch_end = budget_split(lengths, 600, 0.75)
    assert (seed_end, branch_end) == (45, 60)
    assert budget_split(lengths, 600, 0.0) == (0, 60)  # no seed: the expert takes every row


def test_a_vertical_smaller_than_its_budget_splits_the_tokens_it_has() -> None:
    lengths = [10] * 40  # 400 tokens against a budget of 6,400: the seed's share would take them all
    assert budget_split(lengths, 6_400, 0.75) == (30, 40)
    assert budget_split([10, 10], 6_400, 0.75) == (1, 2)  # the expert keeps its last row
    assert budget_split([10], 6_400, 0.75) == (0, 1)


def test_seed_share_is_bounded() -> None:
    with pytest.raises(ValueError):
        DemoConfig(seed_share=1.0)
    assert DemoConfig().seed_share == 0.75
