"""The cached-trunk trainer's batching: every row once per epoch, little padding, seeded; token budgets;
the learning-rate schedule."""

from __future__ import annotations

from experts.chat import EncodedPair
from experts.lora_training import curve_steps, length_batches, lr_factor, take_tokens


def _rows(lengths):
    return [EncodedPair(input_ids=list(range(n)), answer_len=1) for n in lengths]


def test_length_batches_cover_every_row_once_per_epoch_and_are_seeded():
    rows = _rows([5 + (i * 37) % 90 for i in range(100)])
    batches = length_batches(rows, batch_size=8, epochs=2, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(list(range(100)) * 2)
    assert batches == length_batches(rows, batch_size=8, epochs=2, seed=3)
    assert batches != length_batches(rows, batch_size=8, epochs=2, seed=4)


def test_length_batches_pad_less_than_random_batches():
    rows = _rows([5 + (i * 37) % 90 for i in range(256)])

    def padding(batches):
        return sum(
            max(len(rows[i].input_ids) for i in b) * len(b) - sum(len(rows[i].input_ids) for i in b) for b in batches
        )

    plain = [list(range(i, i + 8)) for i in range(0, 256, 8)]
    assert padding(length_batches(rows, 8, 1, seed=0)) < padding(plain) / 3


def test_take_tokens_stops_at_the_budget_and_curve_steps_span_training():
    rows = _rows([10] * 20)
    assert len(take_tokens(rows, 35)) == 4 and len(take_tokens(rows, None)) == 20
    assert curve_steps(30, 4) == {0, 10, 20, 30} and curve_steps(30, 2) == {0, 30}


def test_lr_factor_warms_up_then_decays_to_a_tenth_or_holds_the_peak():
    decayed = [lr_factor(step, 100, decay=True) for step in range(100)]
    held = [lr_factor(step, 100, decay=False) for step in range(100)]
    assert decayed[:5] == held[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # 5 % warm-up, the same for both
    assert all(a >= b for a, b in zip(decayed[4:], decayed[5:]))
    assert decayed[-1] == 0.1 and min(decayed) == 0.1
    assert held[4:] == [1.0] * 96
    assert lr_factor(0, 3, decay=True) == 1.0  # fewer than 20 steps: one warm-up step
