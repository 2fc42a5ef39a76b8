"""Calibration helpers: ECE, temperature scaling, abstain threshold."""

from __future__ import annotations

import numpy as np

from router_model.calibration import choose_threshold, expected_calibration_error, fit_temperature, softmax


def test_ece_is_zero_when_confidence_matches_accuracy():
    confidence = np.full(1000, 0.7)
    correct = np.arange(1000) < 700
    assert expected_calibration_error(confidence, correct) < 1e-9
    assert abs(expected_calibration_error(np.full(1000, 0.95), correct) - 0.25) < 1e-9


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 4000)
    scores = rng.normal(size=(4000, 5))
    scores[np.arange(4000), labels] += 1.5
    logits = 1.5 * scores  # unit-variance Gaussian scores shifted by 1.5: softmax(1.5 * s) is the exact posterior
    sharp = logits * 4  # the same model, overconfident: the right temperature is 4
    t = fit_temperature(sharp, labels)
    assert 3.0 < t < 5.5
    before = softmax(sharp)
    after = softmax(sharp, t)
    ece_before = expected_calibration_error(before.max(1), before.argmax(1) == labels)
    ece_after = expected_calibration_error(after.max(1), after.argmax(1) == labels)
    assert ece_after < ece_before / 3


def test_threshold_reaches_target_precision_with_floor():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([1, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    assert choose_threshold(confidence, correct, target=1.0, floor=0.0) == 0.8
    assert choose_threshold(confidence, correct, target=0.8, floor=0.0) == 0.6
    assert choose_threshold(confidence, correct, target=0.5, floor=0.45) == 0.45
