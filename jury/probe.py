"""A truthfulness probe: a linear read-out of the base model's hidden states over an answer.

Language models carry in their middle layers a direction that separates statements they hold
true from ones they hold false (Azaria & Mitchell 2023, "The Internal State of an LLM Knows When
It's Lying"; Marks & Tegmark 2023, "The Geometry of Truth"). Here the base model reads the
question and the candidate answer; the mean of its hidden states after ``layer`` decoder layers
over the positions that predict the answer (:attr:`experts.types.ExpertScore.answer_state`) goes
through an L2-regularised logistic regression fitted on labelled rows. Its logit is one more piece
of evidence for the calibrator (``base_probe``).

On SmolLM2-135M, crosscheck_dev, the middle layers read best (layers 18-22 of 30 in a scan of
6-30 on the training rows' cross-validation); layer 20 is where the demo experts' adapters begin,
so the state is the shared trunk's own output: no layer runs for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from registry.errors import MoseError


class Probe(BaseModel):
    """A fitted probe in plain numbers (saved inside the calibrator's JSON)."""

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0)
    """Decoder layers the state has been through (0: the embeddings)."""
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float = 0.0
    strength: float = 0.0
    """The inverse L2 strength (scikit-learn's ``C``) chosen by cross-validation."""

    def logits(self, states: np.ndarray) -> np.ndarray:
        """The probe's log-odds of 'correct' for each row of ``states`` ([rows, hidden])."""
        states = np.atleast_2d(np.asarray(states, dtype=np.float64))
        if states.shape[1] != len(self.coef):
            raise MoseError(
                f"the truthfulness probe reads {len(self.coef)}-wide states, got {states.shape[1]}: "
                "was the calibrator trained on another base model?"
            )
        return ((states - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef) + self.intercept


def standardised_logistic(x: np.ndarray, labels: np.ndarray, strength: float) -> dict[str, object]:
    """L2-regularised logistic regression on standardised columns, as plain numbers: ``mean``,
    ``scale``, ``coef``, ``intercept`` (the calibrator's logistic candidate fits the same way)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    model = LogisticRegression(C=strength, max_iter=5000).fit((x - mean) / scale, labels)
    return {
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "coef": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
    }


def _fit(states: np.ndarray, labels: np.ndarray, strength: float, layer: int) -> Probe:
    return Probe(layer=layer, strength=strength, **standardised_logistic(states, labels, strength))


def average_probes(probes: Sequence[Probe]) -> Probe:
    """One probe whose logit is the mean of ``probes``' logits: each is linear in the state, so
    their mean is too (folded into raw-state weights; mean 0, scale 1)."""
    weights = [np.asarray(p.coef) / np.asarray(p.scale) for p in probes]
    offsets = [p.intercept - float(w @ np.asarray(p.mean)) for p, w in zip(probes, weights, strict=True)]
    width = len(weights[0])
    return Probe(
        layer=probes[0].layer,
        strength=probes[0].strength,
        mean=[0.0] * width,
        scale=[1.0] * width,
        coef=np.mean(weights, axis=0).tolist(),
        intercept=float(np.mean(offsets)),
    )


def fit_probe(
    states: np.ndarray,
    labels: np.ndarray,
    layer: int,
    strengths: Sequence[float],
    folds: int = 5,
    seed: int = 0,
    average_folds: bool = False,
) -> tuple[Probe, np.ndarray]:
    """(probe, its out-of-fold logits): the strength with the lowest cross-validated log loss is
    kept. The calibrator learns from the out-of-fold logits, so it weighs the probe as it reads
    rows it was not fitted on. The probe is refitted on every row, or with ``average_folds`` is the
    mean of the fold probes that made those logits: the same fits, so on new rows its logits
    spread as the calibrator learnt them (a refit on more rows at the same strength reads
    sharper)."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    states, labels = np.asarray(states, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    split = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(states, labels))
    best: tuple[float, float, np.ndarray, list[Probe]] | None = None
    for strength in strengths:
        out_of_fold, fold_probes = np.zeros(len(labels)), []
        for train, val in split:
            fold_probes.append(_fit(states[train], labels[train], strength, layer))
            out_of_fold[val] = fold_probes[-1].logits(states[val])
        loss = log_loss(labels, 1.0 / (1.0 + np.exp(-np.clip(out_of_fold, -40, 40))), labels=[0, 1])
        if best is None or loss < best[0]:
            best = (loss, strength, out_of_fold, fold_probes)
    _, strength, out_of_fold, fold_probes = best
    probe = average_probes(fold_probes) if average_folds else _fit(states, labels, strength, layer)
    return probe, out_of_fold


__all__ = ["Probe", "average_probes", "fit_probe"]
