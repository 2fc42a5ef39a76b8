"""Turn a jury's evidence into P(correct), and choose the flag threshold.

P(correct) = P(the answer belongs to the question) x P(correct | it does).

The first factor is the relevance gate: a logistic regression with non-negative weights on the
jurors' support (jury PMI and log-probability given the question), fitted on the labelled answers
against answers constructed to be wrong (:mod:`jury.negatives`: moved from another question, or
with a fact changed). The second is chosen among candidates fitted on the labelled rows only:
logistic regression on the evidence features (standardised; several L2 strengths), shallow
gradient-boosted trees on the evidence and format features, isotonic regression on the jury PMI,
or the base rate when nothing in the evidence predicts correctness. The candidate with the lowest
cross-validated log loss that never lowers P(correct) for more support is refitted on every row.
The flag threshold is the largest P(correct) below which flagged answers are wrong with at least
``target_flag_precision``, on out-of-fold predictions of every row (validation metrics are
out-of-fold too). Artifacts are versioned JSON under ``MOSE_HOME/crosscheck/`` (no pickles).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jury.probe import Probe, fit_probe, standardised_logistic
from registry.artifacts import atomic_write
from registry.errors import MoseError, ServerError, UnavailableError
from router_model.calibration import choose_threshold, expected_calibration_error

if TYPE_CHECKING:
    from sklearn.model_selection import StratifiedKFold

EVIDENCE_FEATURES: tuple[str, ...] = (
    "jury_pmi",
    "jury_logp_given",
    "jury_logp_without",
    "jury_pmi_spread",
    "base_pmi",
    "base_logp_given",
    "base_logp_without",
    "contrast_logp_given",
    "contrast_pmi",
    "contrast_logp_without",
    "contrast_logp_given_max",
    "agreement",
)
"""What the jurors say: reputation-weighted means over the experts, the base model's own
evidence, and the experts-minus-base contrast (does the specialist find the answer likelier
than the generalist does?)."""

FORMAT_FEATURES: tuple[str, ...] = ("log_answer_tokens", "log_question_chars", "long_answer")
"""The shape of the item: how much an evidence value means depends on it (a mean log-prob over
5 tokens is not one over 200)."""

CHECK_FEATURES: tuple[str, ...] = ("arithmetic_slip",)
"""What a reader finds by checking the answer's text (:mod:`jury.checks`): 1.0 when a
calculation it states has a wrong result. A failed check only ever counts against an answer: with
everything else equal it must not raise P(correct)."""

FEATURES: tuple[str, ...] = (
    EVIDENCE_FEATURES
    + FORMAT_FEATURES
    + tuple(f"{name}_x_long" for name in EVIDENCE_FEATURES)
    + tuple(f"{name}_x_log_answer_tokens" for name in EVIDENCE_FEATURES)
    + CHECK_FEATURES
)
"""Columns the calibrator sees, in order (see :func:`jury.jury.features`); the interactions let
a linear model weigh evidence differently for short answers and long responses."""

PROBE_FEATURE = "base_probe"
"""The column a calibrator with a truthfulness probe (:mod:`jury.probe`) has after
:data:`FEATURES`: the probe's logit on the base model's answer state."""

CURRENT_FILE = "current"


class CalibratorConfig(BaseModel):
    """How the calibrator is fitted."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    folds: int = Field(5, ge=2, le=20)
    """Cross-validation folds: the method and the flag threshold are chosen on out-of-fold predictions."""

    target_flag_precision: float = Field(0.7, gt=0.0, le=1.0)
    """Wanted share of flagged answers that are really wrong."""

    max_flag_probability: float = Field(0.5, gt=0.0, le=1.0)
    """Never flag an answer whose P(correct) is above this."""

    regularisation: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    """Inverse L2 strengths (scikit-learn's ``C``) tried for the logistic model; the best by
    cross-validated log loss is kept."""

    candidates: tuple[Literal["logistic", "monotone logistic", "boosted", "isotonic", "base rate"], ...] = Field(
        ("logistic", "monotone logistic", "boosted", "isotonic", "base rate"), min_length=1
    )
    """Families of candidates tried (each logistic family at every strength of :attr:`regularisation`)."""

    boosted_trees: int = Field(100, ge=0)
    """Trees of the gradient-boosted candidate (0 leaves it out); 100 trees of depth 2 at rate 0.05
    is the fit ``docs/decisions/jury-calibrator-fitting.md`` measured best."""

    boosted_depth: int = Field(2, ge=1, le=5)
    """Depth of each boosted tree (2 = interactions of two features at most)."""

    boosted_learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    """Shrinkage of each boosted tree's contribution."""

    boosted_min_leaf: int = Field(20, ge=1)
    """Fewest training rows in a leaf, so no leaf is fitted to a handful of items."""

    seed: int = 0
    """Seed of the train/validation split."""

    probe_layer: int | None = Field(20, ge=0)
    """Layer of the base model whose hidden states, averaged over the answer, the truthfulness
    probe reads (:mod:`jury.probe`); None: no probe. On SmolLM2-135M layers 18-22 read best on
    the training rows' cross-validation; 20 is where the demo experts' adapters begin (the
    shared trunk's output: no layer runs for it)."""

    probe_strengths: tuple[float, ...] = Field((0.001, 0.003, 0.01), min_length=1)
    """Inverse L2 strengths tried for the probe's logistic regression on its 576 standardised
    inputs (strong regularisation: a few thousand rows); the best by cross-validated log loss is kept."""

    probe_negatives: bool = True
    """The probe also learns, as wrong, the wrong answers constructed from its extra rows
    (``probe_rows``: answers moved to another question, a fact changed; :mod:`jury.negatives`),
    whose states cost what the extra rows' do. It then reads an answer to another question as
    false instead of leaving that to the relevance gate alone. On the first start's rows: labelled
    AUROC 0.60 against 0.56, answers moved to another question 0.94 against 0.89. The jury's own
    constructed rows stay out of the probe (learnt too, they took labelled AUROC to 0.58;
    docs/decisions/jury-probe-candidate.md)."""

    probe_candidate: bool = True
    """With a probe, the candidate is the probe's logit Platt-scaled on the out-of-fold logits of
    every labelled row the probe learnt from (the scored rows and ``probe_rows``), instead of the
    family with the lowest cross-validated log loss on the scored rows alone. At the first start
    those are 100 rows, and the choice moved with the folds' seed between a probe-led logistic and
    the base rate (labelled AUROC 0.60 against 0.41); beside the probe the jurors' own evidence got
    weights near 0 either way. The jurors' evidence still sets the relevance gate and the votes."""

    text_checks: bool = True
    """The calibrator reads :data:`CHECK_FEATURES` (a calculation the answer states with a wrong
    result, or a wrong solution of the question's equation: :mod:`jury.checks`). With the probe
    candidate each check lowers the log-odds by a shift <= 0 fitted beside the Platt scaling on
    every labelled row the probe learnt from; the other families see the column (the boosted trees
    decreasing in it). Off: the columns are zeroed before fitting. On the first start's rows: GSM8K
    AUROC 0.558 against 0.548, the rest unchanged (docs/decisions/jury-text-checks.md)."""

    check_prior_scale: float = Field(2.0, gt=0.0)
    """Standard deviation, in log-odds, of the Gaussian prior on each check's shift: a failed check
    is rare in the training rows (6 of the first start's 1,100), so its shift is a MAP estimate
    that stays finite when none of the rows failing it is correct."""

    probe_average_folds: bool = False
    """The probe kept is the mean of its cross-validation folds' probes (whose out-of-fold logits
    the calibrator learnt from) instead of a refit on every row, which reads new rows more sharply
    than the calibrator expects."""

    gate_features: tuple[str, ...] = ("jury_pmi", "jury_logp_given")
    """What the relevance gate reads (each must be one of :data:`MONOTONE_FEATURES`: its weights are
    kept >= 0). Both separate an answer from answers to other questions on crosscheck_dev's training
    rows; the jury PMI most (AUROC about 0.94 against the answers they were moved from)."""

    off_topic_share: float = Field(0.2, gt=0.0, lt=1.0)
    """Weight of the constructed wrong answers against the labelled rows, as a share of the total,
    when the gate is fitted and the flag threshold chosen. Lower trusts answers more: fewer flags,
    answers moved from other questions caught less often. On the first start's calibrator (with
    :attr:`probe_negatives`), 0.2 flagged 95 % of the answers moved to another question for
    labelled AUROC 0.60 (0.1: 92 % for 0.63; 0.3: 98 % for 0.57; docs/decisions/jury-probe-candidate.md)."""

    gate_strength: float = Field(10.0, gt=0.0)
    """Inverse L2 strength of the gate's logistic regression (two standardised inputs: weak
    regularisation)."""

    plausibility_features: tuple[str, ...] = ()
    """What the plausibility term reads (each one of :data:`MONOTONE_FEATURES`; empty, the default:
    no term; ``jury_logp_given`` is the term measured).
    The term adds ``coef . z(features)`` to the log-odds, its weights >= 0 fitted on pairs of a
    correct training answer and the same answer with a fact changed (:mod:`jury.negatives`), so a
    plainly wrong answer the jurors find less likely reads less likely to be correct. The
    labelled sources cannot teach this: their wrong answers are fluent and as likely as the right
    ones (docs/decisions/jury-plausibility-term.md). Beside a probe that learns from constructed
    wrong answers (:attr:`probe_negatives`) the term bought 2-5 points of the sanity suite for
    0.02-0.10 labelled AUROC, so it is off by default (docs/decisions/jury-probe-candidate.md)."""

    plausibility_strength: float = Field(1.0, gt=0.0)
    """Inverse L2 strength of the plausibility term's pairwise fit (higher: steeper term; a few
    dozen pairs: moderate regularisation)."""

    recalibrate: bool = False
    """Platt scaling after the chosen candidate: a logistic fit of the labels on its out-of-fold
    log-odds (slope, offset), applied to the refitted candidate, as scikit-learn's
    ``CalibratedClassifierCV(method="sigmoid", ensemble=False)``. Corrects a fitting procedure that
    is systematically over- or under-confident on rows it did not see (the probe candidate,
    :attr:`probe_candidate`, is Platt-scaled on more rows already)."""

    recalibrate_output: bool = False
    """Platt scaling of the final P(correct), after the plausibility term and the relevance gate:
    a logistic fit of the labelled rows' labels on their out-of-fold P(correct). The term spreads
    the labelled answers' log-odds and the gate lowers them, neither with the labelled rows'
    calibration in view; this maps the whole product back onto them (monotone: the ranking is
    kept, the flag threshold is chosen after it). Not applied when the fitted slope is not positive.
    Off by default: on an earlier first-start calibrator it took the labelled rows' ECE from 0.112 to
    0.025 but, with a ranking that weak, brought answers to another question up to the base rate
    (flagged 37-87 % instead of 96-100 %): docs/decisions/jury-output-recalibration.md."""


class Tree(BaseModel):
    """One regression tree in flat arrays (scikit-learn's layout): node ``i`` splits on
    ``feature[i] <= threshold[i]`` into ``left[i]`` / ``right[i]``; a leaf has ``left[i] == -1``
    and adds ``value[i]`` to the log-odds."""

    model_config = ConfigDict(extra="forbid")

    feature: list[int]
    threshold: list[float]
    left: list[int]
    right: list[int]
    value: list[float]

    def leaf_values(self, x: np.ndarray) -> np.ndarray:
        """The value of the leaf each row of ``x`` ends in (all rows walk down together)."""
        node = np.zeros(len(x), dtype=np.int64)
        left, right = np.asarray(self.left), np.asarray(self.right)
        feature, threshold = np.asarray(self.feature), np.asarray(self.threshold)
        for _ in range(len(self.left)):  # depth <= node count; stops when every row is at a leaf
            inner = left[node] >= 0
            if not inner.any():
                break
            at = node[inner]
            goes_left = x[inner, feature[at]] <= threshold[at]
            node[inner] = np.where(goes_left, left[at], right[at])
        return np.asarray(self.value)[node]


class RelevanceGate(BaseModel):
    """P(the answer belongs to the question): a logistic regression on standardised support
    features with non-negative weights, fitted on labelled answers (which all answer their own
    question) against answers constructed to be wrong (moved from another question, or with a fact
    changed; :mod:`jury.negatives`)."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float

    def predict(self, x: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """P(belongs) for each row of ``x``, whose columns are ``names``."""
        columns = [list(names).index(name) for name in self.features]
        z = (x[:, columns] - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(z @ np.asarray(self.coef) + self.intercept)


class PlausibilityTerm(BaseModel):
    """A shift of the log-odds by the jurors' support for the answer, standardised, with weights
    >= 0 fitted so that a correct answer scores above the same answer with a fact changed
    (conditional logistic regression on such pairs: what the question makes likely cancels)."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    pairs: int = 0
    """Training pairs it was fitted on."""

    def shift(self, x: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """The log-odds added to each row of ``x``, whose columns are ``names``."""
        columns = [list(names).index(name) for name in self.features]
        return ((x[:, columns] - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef)


class Calibrator(BaseModel):
    """A fitted calibrator: plain numbers, so it saves as JSON and loads anywhere.

    With a :attr:`gate`, P(correct) = P(the answer belongs to the question) x P(correct | it
    does): the gate is fitted on constructed wrong answers, the candidate on the labelled rows,
    and a :attr:`plausibility` term shifts the candidate's log-odds by the jurors' support."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["logistic", "boosted", "isotonic", "constant"]
    features: list[str] = Field(default_factory=lambda: list(FEATURES))
    mean: list[float] = Field(default_factory=list)
    scale: list[float] = Field(default_factory=list)
    coef: list[float] = Field(default_factory=list)
    intercept: float = 0.0
    iso_x: list[float] = Field(default_factory=list)
    iso_y: list[float] = Field(default_factory=list)
    columns: list[int] = Field(default_factory=list)
    """Boosted: the feature columns the trees see (their ``feature`` indexes into these)."""
    trees: list[Tree] = Field(default_factory=list)
    learning_rate: float = 0.0
    threshold: float = 0.5
    """Flag when P(correct) is below this."""
    recalibration: tuple[float, float] | None = None
    """Platt scaling (slope, offset) applied to the candidate's log-odds (None: none)."""
    probe: Probe | None = None
    """The truthfulness probe whose logit is the ``base_probe`` column (None: no such column)."""
    voter: Calibrator | None = None
    """With a probe: a calibrator without it, fitted on the same rows, for the jurors' votes. The
    probe is the base model's and moves every juror's P(correct) alike, so beside it an expert's
    own evidence barely moves P(correct) and votes would be close to coins (read through the probe,
    the reputation benchmark's shuffled juror gained weight)."""
    gate: RelevanceGate | None = None
    """The relevance gate whose P(belongs) multiplies the candidate's P(correct) (None: no gate)."""
    plausibility: PlausibilityTerm | None = None
    """The term added to the candidate's log-odds before the gate (None: none)."""
    output_recalibration: tuple[float, float] | None = None
    """Platt scaling (slope, offset) applied to the log-odds of the gated P(correct) (None: none)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    trained_on: dict[str, object] = Field(default_factory=dict)
    version: str = ""
    created_at: str = ""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(correct) for each row of the feature matrix ``x`` (columns in :attr:`features` order)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        p = self._candidate_predict(x)
        if self.recalibration is not None:
            p = platt_scaled(p, self.recalibration)
        if self.plausibility is not None:
            p = _sigmoid(_logit(p) + self.plausibility.shift(x, self.features))
        if self.gate is not None:
            p = p * self.gate.predict(x, self.features)
        if self.output_recalibration is not None:
            p = platt_scaled(p, self.output_recalibration)
        return p

    def _candidate_predict(self, x: np.ndarray) -> np.ndarray:
        if self.method == "logistic":
            z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
            logits = z @ np.asarray(self.coef) + self.intercept
            return _sigmoid(logits)
        if self.method == "constant":
            return np.full(len(x), _sigmoid(np.array(self.intercept)))
        if self.method == "boosted":
            inputs, logits = x[:, self.columns], np.full(len(x), self.intercept)
            for tree in self.trees:
                logits += self.learning_rate * tree.leaf_values(inputs)
            return _sigmoid(logits)
        score = x[:, self.features.index("jury_pmi")]
        return np.interp(score, np.asarray(self.iso_x), np.asarray(self.iso_y))


Calibrator.model_rebuild()


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -40, 40)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def platt_scaled(p: np.ndarray, scaling: tuple[float, float]) -> np.ndarray:
    """``p`` through Platt scaling ``(slope, offset)`` of its log-odds."""
    slope, offset = scaling
    return _sigmoid(slope * _logit(p) + offset)


def fit_platt(p: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(slope, offset) of Platt scaling: unregularised logistic regression of ``labels`` on the
    log-odds of ``p``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p)[:, None], labels)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


TREE_FEATURES: tuple[str, ...] = EVIDENCE_FEATURES + FORMAT_FEATURES + CHECK_FEATURES
"""What the boosted trees see: the interactions of :data:`FEATURES` are theirs to find."""


MONOTONE_FEATURES: tuple[str, ...] = (
    "jury_pmi",
    "jury_logp_given",
    "contrast_pmi",
    "contrast_logp_given",
    "contrast_logp_given_max",
    "agreement",
)
"""Support for the answer from the experts who read the question: with everything else equal, more
of it must not lower P(correct). The boosted trees are constrained to it, the isotonic candidate is
increasing, and a logistic candidate that breaks it on the training rows is not chosen."""


def fit_boosted(
    x: np.ndarray, labels: np.ndarray, config: CalibratorConfig, names: Sequence[str] = FEATURES
) -> Calibrator:
    """Gradient-boosted trees (scikit-learn's histogram boosting, log loss) on :data:`TREE_FEATURES`
    (and the probe's column when ``names``, the columns of ``x``, have it), increasing in
    :data:`MONOTONE_FEATURES`, stored as plain arrays."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    seen = [name for name in TREE_FEATURES + (PROBE_FEATURE,) if name in names]
    columns = [list(names).index(name) for name in seen]
    model = HistGradientBoostingClassifier(
        max_iter=config.boosted_trees,
        max_depth=config.boosted_depth,
        learning_rate=config.boosted_learning_rate,
        min_samples_leaf=config.boosted_min_leaf,
        early_stopping=False,
        random_state=config.seed,
        monotonic_cst=[1 if name in MONOTONE_FEATURES else -1 if name in CHECK_FEATURES else 0 for name in seen],
    )
    model.fit(x[:, columns], labels)
    trees = []
    for (predictor,) in model._predictors:  # one tree per iteration for a binary task
        nodes = predictor.nodes
        leaf = nodes["is_leaf"].astype(bool)
        trees.append(
            Tree(
                feature=nodes["feature_idx"].tolist(),
                threshold=nodes["num_threshold"].tolist(),
                left=np.where(leaf, -1, nodes["left"].astype(np.int64)).tolist(),
                right=np.where(leaf, -1, nodes["right"].astype(np.int64)).tolist(),
                value=nodes["value"].tolist(),
            )
        )
    # leaf values already carry the learning rate; the trees start from the baseline log-odds
    return Calibrator(
        method="boosted",
        columns=columns,
        trees=trees,
        learning_rate=1.0,
        intercept=float(np.ravel(model._baseline_prediction)[0]),
    )


def raise_support(x: np.ndarray, names: Sequence[str], feature: str, delta: float) -> np.ndarray:
    """A copy of ``x`` with ``feature`` raised by ``delta`` on every row, its interaction columns
    (:data:`FEATURES`' ``_x_long`` and ``_x_log_answer_tokens``) moved with it."""
    names = list(names)
    x = np.array(x, dtype=np.float64, copy=True)
    x[:, names.index(feature)] += delta
    for suffix, factor in (("_x_long", "long_answer"), ("_x_log_answer_tokens", "log_answer_tokens")):
        if feature + suffix in names:
            x[:, names.index(feature + suffix)] += delta * x[:, names.index(factor)]
    return x


def is_monotone(calibrator: Calibrator, x: np.ndarray, delta: float = 0.5) -> bool:
    """True when raising any of :data:`MONOTONE_FEATURES` by ``delta`` lowers P(correct) on no row
    of ``x``, and failing any of :data:`CHECK_FEATURES` raises it on none."""
    p = calibrator.predict(x)
    supported = all(
        np.all(calibrator.predict(raise_support(x, calibrator.features, feature, delta)) >= p - 1e-9)
        for feature in MONOTONE_FEATURES
        if feature in calibrator.features
    )
    return supported and all(
        np.all(calibrator.predict(fail_check(x, calibrator.features, check)) <= p + 1e-9)
        for check in CHECK_FEATURES
        if check in calibrator.features
    )


def fail_check(x: np.ndarray, names: Sequence[str], check: str) -> np.ndarray:
    """A copy of ``x`` in which every row fails ``check`` (one of :data:`CHECK_FEATURES`)."""
    x = np.array(x, dtype=np.float64, copy=True)
    x[:, list(names).index(check)] = 1.0
    return x


def fit_logistic(x: np.ndarray, labels: np.ndarray, strength: float) -> Calibrator:
    """L2-regularised logistic regression on standardised features."""
    return Calibrator(method="logistic", **standardised_logistic(x, labels, strength))


def fit_calibrator(
    x: np.ndarray,
    labels: np.ndarray,
    config: CalibratorConfig | None = None,
    states: np.ndarray | None = None,
    constructed: np.ndarray | None = None,
    perturbed_pairs: Sequence[tuple[int, int]] = (),
    probe_rows: tuple[np.ndarray, np.ndarray] | None = None,
    probe_negative_states: np.ndarray | None = None,
    probe_checks: np.ndarray | None = None,
) -> Calibrator:
    """Fit the candidate on the labelled rows (with a probe and
    :attr:`~CalibratorConfig.probe_candidate`, the probe's logit Platt-scaled; otherwise the
    family, among logistic at each strength, boosted trees, isotonic and the base rate, with the
    lowest cross-validated log loss, refitted), gate it with a :class:`RelevanceGate` when there
    are constructed rows, and set the flag threshold on out-of-fold predictions of every row.

    ``x``: the :data:`FEATURES` columns. ``states`` (the base model's answer states at
    ``config.probe_layer``, one row each): a truthfulness probe is fitted first, and its
    out-of-fold logits join the features as :data:`PROBE_FEATURE`. ``constructed``: True for rows
    made wrong on purpose (:mod:`jury.negatives`; their label is 0); the candidate never learns
    from them (they would teach it that every wrong answer looks like an answer to another
    question), the gate learns from them and the labelled rows. ``perturbed_pairs``: (correct
    row, the same answer with a fact changed) indexes, what the plausibility term is fitted on.
    ``probe_rows``: (answer states, labels) of more labelled rows for the probe alone (states cost
    a fraction of the jury's evidence): it is fitted on them and the labelled rows of ``x``
    together, and the candidate learns from its out-of-fold logits on the latter.
    ``probe_negative_states``: answer states of wrong answers constructed from those rows, which the
    probe learns from as wrong (:attr:`CalibratorConfig.probe_negatives`). ``probe_checks``: the
    :data:`CHECK_FEATURES` columns of ``probe_rows`` (none: no check failed), which the probe
    candidate's check shifts are fitted on with the labelled rows' (:attr:`CalibratorConfig.text_checks`).
    """
    from sklearn.metrics import roc_auc_score

    config = config or CalibratorConfig()
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    constructed = np.zeros(len(labels), dtype=bool) if constructed is None else np.asarray(constructed, dtype=bool)
    if labels[constructed].any():
        raise MoseError("constructed rows are wrong answers: their label must be 0")
    labelled = ~constructed
    if not config.text_checks:
        x = _without_checks(x)
    best, p_oof = _fit_candidate(
        x[labelled],
        labels[labelled],
        config,
        None if states is None else states[labelled],
        probe_rows,
        probe_negative_states,
        probe_checks if config.text_checks else None,
    )
    p_all = np.empty(len(labels))
    p_all[labelled] = p_oof
    if constructed.any():  # the candidate never saw these rows: its predictions are out of sample
        inputs = x[constructed]
        if best.probe is not None:
            inputs = np.column_stack([inputs, best.probe.logits(states[constructed])])
        p_all[constructed] = best.predict(inputs)
    if config.plausibility_features and perturbed_pairs:
        best.plausibility = fit_plausibility(x, perturbed_pairs, config)
        p_all = _sigmoid(_logit(p_all) + best.plausibility.shift(x, FEATURES))
    if constructed.any():
        best.gate, gate_oof = fit_gate(x, constructed, config)
        p_all *= gate_oof
        best.metrics["gate_validation_auroc"] = float(roc_auc_score(labelled, gate_oof))
    if config.recalibrate_output:
        p_all = _recalibrate_output(best, p_all, labels, labelled, config)
    flag_cut = choose_threshold(
        1.0 - p_all,
        labels == 0,
        config.target_flag_precision,
        1.0 - config.max_flag_probability,
        _row_weights(constructed, config),
    )
    best.threshold = float(1.0 - flag_cut)
    best.metrics.update(
        {
            "validation_auroc": float(roc_auc_score(labels[labelled], p_all[labelled])),
            "validation_ece": expected_calibration_error(p_all[labelled], labels[labelled]),
            "train_rows": float(labelled.sum()),
            "validation_rows": float(labelled.sum()),
            "constructed_rows": float(constructed.sum()),
        }
    )
    if best.probe is not None:
        best.voter = fit_calibrator(x, labels, config, None, constructed, perturbed_pairs)
    return best


def _without_checks(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` in which no row fails a check (:data:`CHECK_FEATURES` zeroed)."""
    x = np.array(x, dtype=np.float64, copy=True)
    x[:, [FEATURES.index(check) for check in CHECK_FEATURES]] = 0.0
    return x


def _recalibrate_output(
    best: Calibrator, p_all: np.ndarray, labels: np.ndarray, labelled: np.ndarray, config: CalibratorConfig
) -> np.ndarray:
    """Set ``best.output_recalibration`` from the labelled rows' out-of-fold ``p_all`` and return
    ``p_all`` scaled by it: the labelled rows by fits on the other folds (so the metrics stay out
    of fold), the constructed rows by the fit on every labelled row (as served)."""
    slope, offset = fit_platt(p_all[labelled], labels[labelled])
    best.metrics["output_recalibration_slope"] = slope
    if slope <= 0:  # the product ranks the labelled rows at or below chance: a flipped or flat map
        return p_all  # would undo the gate and the jurors' support direction, so none is applied
    best.output_recalibration = (slope, offset)
    scaled = platt_scaled(p_all, best.output_recalibration)
    scaled[labelled] = _cross_fitted_platt(p_all[labelled], labels[labelled], _label_folds(labels[labelled], config))
    return scaled


def _label_folds(labels: np.ndarray, config: CalibratorConfig):
    """``config.folds`` stratified, shuffled folds of ``labels`` (fewer when a class has fewer rows)."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(config.folds, int(min(np.bincount(labels, minlength=2))))
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)


def _row_weights(constructed: np.ndarray, config: CalibratorConfig) -> np.ndarray:
    """Weights that make the constructed rows ``off_topic_share`` of the total: how many of them
    were built does not decide how often the threshold flags answers."""
    weight = np.ones(len(constructed))
    if constructed.any():
        share = config.off_topic_share
        weight[constructed] = share / (1 - share) * (~constructed).sum() / constructed.sum()
    return weight


def _fit_candidate(
    x: np.ndarray,
    labels: np.ndarray,
    config: CalibratorConfig,
    states: np.ndarray | None,
    probe_rows: tuple[np.ndarray, np.ndarray] | None = None,
    probe_negative_states: np.ndarray | None = None,
    probe_checks: np.ndarray | None = None,
) -> tuple[Calibrator, np.ndarray]:
    """The candidate, refitted on every row, and its out-of-fold predictions (``probe_rows``,
    ``probe_negative_states``, ``probe_checks``: as in :func:`fit_calibrator`): with a probe and
    :attr:`~CalibratorConfig.probe_candidate`, the probe's logit Platt-scaled; otherwise the best
    family by cross-validated log loss that keeps :data:`MONOTONE_FEATURES`' direction."""
    from sklearn.metrics import log_loss, roc_auc_score

    if len(labels) < 20 or min(np.bincount(labels, minlength=2)) < 2:
        raise MoseError("calibration needs at least 20 labelled rows with both correct and wrong answers")
    names, probe = list(FEATURES), None
    if states is not None:
        if config.probe_layer is None:
            raise MoseError("answer states were given but probe_layer is None")
        probe_states, probe_labels = _probe_training_rows(states, labels, probe_rows)
        labelled_for_probe = len(probe_labels)  # the constructed wrong answers come after these
        if probe_negative_states is not None and len(probe_negative_states):
            probe_states, probe_labels = _probe_training_rows(
                probe_states,
                probe_labels,
                (probe_negative_states, np.zeros(len(probe_negative_states), dtype=np.int64)),
            )
        probe, probe_logits = fit_probe(
            probe_states,
            probe_labels,
            config.probe_layer,
            config.probe_strengths,
            min(config.folds, int(min(np.bincount(probe_labels, minlength=2)))),
            config.seed,
            config.probe_average_folds,
        )
        if config.probe_candidate:
            best, p_oof = _probe_candidate(
                probe,
                probe_logits[:labelled_for_probe],
                probe_labels[:labelled_for_probe],
                _labelled_checks(x, probe_checks, labelled_for_probe - len(labels)),
                len(labels),
                config,
            )
            return best, _recalibrated_candidate(best, p_oof, labels, config)
        probe_logits = probe_logits[: len(labels)]  # cross-fitted: each from a probe that did not see the row
        x, names = np.column_stack([x, probe_logits]), names + [PROBE_FEATURE]
    pmi = FEATURES.index("jury_pmi")
    families = {
        **{f"logistic C={c:g}": (lambda xs, ys, c=c: fit_logistic(xs, ys, c)) for c in config.regularisation},
        **{
            f"monotone logistic C={c:g}": (lambda xs, ys, c=c: fit_monotone_logistic(xs, ys, c, names))
            for c in config.regularisation
        },
        "boosted": lambda xs, ys: fit_boosted(xs, ys, config, names),
        "isotonic": lambda xs, ys: fit_isotonic(xs[:, pmi], ys),
        "base rate": lambda xs, ys: fit_constant(ys),
    }
    candidates = {
        name: fit
        for name, fit in families.items()
        if name.split(" C=")[0] in config.candidates and (name != "boosted" or config.boosted_trees)
    }
    if not candidates:
        raise MoseError("no calibrator candidate left: boosted_trees is 0 and no other family is in candidates")
    split = _label_folds(labels, config)
    out_of_fold = {
        name: _out_of_fold(labels, split, lambda train, val, fit=fit: fit(x[train], labels[train]).predict(x[val]))
        for name, fit in candidates.items()
    }
    losses = {name: log_loss(labels, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1]) for name, p in out_of_fold.items()}
    for chosen in sorted(losses, key=losses.get):  # the best candidate that keeps MONOTONE_FEATURES' direction
        best = candidates[chosen](x, labels)
        best.features, best.probe = names, probe
        if is_monotone(best, x):
            break

    p_oof = out_of_fold[chosen]
    best.metrics = {
        "validation_log_loss": float(losses[chosen]),
        **({"validation_log_loss_isotonic": float(losses["isotonic"])} if "isotonic" in losses else {}),
        **{f"cv_log_loss {name}": float(loss) for name, loss in losses.items()},
    }
    p_oof = _recalibrated_candidate(best, p_oof, labels, config)
    if probe is not None:
        best.metrics["probe_validation_auroc"] = float(roc_auc_score(labels, probe_logits))
    best.trained_on = {"candidate": chosen}
    return best, p_oof


def _labelled_checks(x: np.ndarray, probe_checks: np.ndarray | None, probe_rows: int) -> np.ndarray:
    """The :data:`CHECK_FEATURES` columns of every labelled row the probe learnt from: the scored
    rows' (``x``), then the ``probe_rows`` extra rows' (``probe_checks``; none given: no check failed)."""
    scored = x[:, [FEATURES.index(check) for check in CHECK_FEATURES]]
    if probe_checks is None:
        probe_checks = np.zeros((probe_rows, len(CHECK_FEATURES)))
    return np.concatenate([scored, np.asarray(probe_checks, dtype=np.float64).reshape(probe_rows, len(CHECK_FEATURES))])


def _recalibrated_candidate(
    best: Calibrator, p_oof: np.ndarray, labels: np.ndarray, config: CalibratorConfig
) -> np.ndarray:
    """With :attr:`~CalibratorConfig.recalibrate`: set ``best.recalibration`` from the out-of-fold
    ``p_oof`` and return them scaled, each fold by a fit on the others (the metrics stay out of
    fold); otherwise ``p_oof`` as it is."""
    from sklearn.metrics import log_loss

    if not config.recalibrate:
        return p_oof
    best.recalibration = fit_platt(p_oof, labels)
    p_oof = _cross_fitted_platt(p_oof, labels, _label_folds(labels, config))
    best.metrics["validation_log_loss_recalibrated"] = float(
        log_loss(labels, np.clip(p_oof, 1e-6, 1 - 1e-6), labels=[0, 1])
    )
    return p_oof


def _probe_training_rows(
    states: np.ndarray, labels: np.ndarray, more: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``states`` and ``labels`` with the rows of ``more`` (states, labels) after them."""
    if more is None or not len(more[1]):
        return states, labels
    if np.shape(more[0])[1:] != states.shape[1:]:
        raise MoseError(
            f"the probe's extra rows have {np.shape(more[0])[1:]}-wide states, the scored rows "
            f"{states.shape[1:]}: read both at the same layer of the same base model"
        )
    return (
        np.concatenate([states, np.asarray(more[0], dtype=np.float64)]),
        np.concatenate([labels, np.asarray(more[1], dtype=np.int64)]),
    )


def _probe_candidate(
    probe: Probe, logits: np.ndarray, labels: np.ndarray, checks: np.ndarray, scored: int, config: CalibratorConfig
) -> tuple[Calibrator, np.ndarray]:
    """The probe's logit Platt-scaled, each failed check (``checks``: :data:`CHECK_FEATURES`
    columns) shifting the log-odds by a fitted amount <= 0 (:func:`fit_probe_scaling`), fitted on
    ``logits`` (out-of-fold, of the labelled rows the probe learnt from; the first ``scored`` are
    the rows the jury scored), and the scored rows' predictions, each fold's by a fit on the others."""
    from sklearn.metrics import log_loss, roc_auc_score

    slope, offset, shifts = fit_probe_scaling(logits, checks, labels, config.check_prior_scale)
    names = [*FEATURES, PROBE_FEATURE]
    coef = np.zeros(len(names))
    coef[-1] = slope
    coef[[names.index(check) for check in CHECK_FEATURES]] = shifts
    candidate = Calibrator(
        method="logistic",
        features=names,
        mean=[0.0] * len(names),
        scale=[1.0] * len(names),
        coef=coef.tolist(),
        intercept=offset,
        probe=probe,
    )

    def scaled_fold(train: np.ndarray, val: np.ndarray) -> np.ndarray:
        fold_slope, fold_offset, fold_shifts = fit_probe_scaling(
            logits[train], checks[train], labels[train], config.check_prior_scale
        )
        return _sigmoid(fold_slope * logits[val] + fold_offset + checks[val] @ fold_shifts)

    p_oof = _out_of_fold(labels, _label_folds(labels, config), scaled_fold)[:scored]
    candidate.metrics = {
        "validation_log_loss": float(log_loss(labels[:scored], np.clip(p_oof, 1e-6, 1 - 1e-6), labels=[0, 1])),
        "probe_validation_auroc": float(roc_auc_score(labels[:scored], logits[:scored])),
        "probe_labelled_rows": float(len(labels)),
        **{f"check_shift {check}": float(shift) for check, shift in zip(CHECK_FEATURES, shifts, strict=True)},
    }
    failed = int((checks > 0).any(axis=1).sum())
    candidate.trained_on = {
        "candidate": f"probe, Platt-scaled on {len(labels)} labelled rows ({failed} failing a check)"
    }
    return candidate, p_oof


def fit_probe_scaling(
    logits: np.ndarray, checks: np.ndarray, labels: np.ndarray, prior_scale: float
) -> tuple[float, float, np.ndarray]:
    """(slope, offset, shifts) of ``labels`` ~ sigmoid(slope * logits + offset + checks @ shifts):
    Platt scaling with a shift <= 0 for each check column, each shift with a Gaussian prior of
    standard deviation ``prior_scale`` (slope and offset are unpenalised, as in :func:`fit_platt`)."""
    from scipy.optimize import minimize

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    checks = np.asarray(checks, dtype=np.float64).reshape(len(labels), -1)
    inputs = np.column_stack([logits, np.ones(len(labels)), checks])
    ridge = np.r_[0.0, 0.0, np.full(checks.shape[1], 1.0 / prior_scale**2)]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = inputs @ theta
        value = np.sum(np.logaddexp(0, z) - labels * z) + 0.5 * np.sum(ridge * theta**2)
        return value, inputs.T @ (_sigmoid(z) - labels) + ridge * theta

    bounds = [(None, None), (None, None)] + [(None, 0.0)] * checks.shape[1]
    theta = minimize(loss, np.r_[1.0, 0.0, np.zeros(checks.shape[1])], jac=True, method="L-BFGS-B", bounds=bounds).x
    return float(theta[0]), float(theta[1]), theta[2:]


def fit_constant(labels: np.ndarray) -> Calibrator:
    """The base rate: what the evidence is worth when nothing in it predicts correctness."""
    rate = float(np.clip(np.mean(labels), 0.01, 0.99))
    return Calibrator(method="constant", intercept=float(_logit(np.array(rate))))


def require_support(what: str, features: Sequence[str]) -> None:
    """Refuse ``features`` that are not :data:`MONOTONE_FEATURES`: the gate's and the plausibility
    term's weights are kept >= 0, which is only principled for support."""
    unknown = set(features) - set(MONOTONE_FEATURES)
    if unknown:
        raise MoseError(
            f"{what} features must be support features ({', '.join(MONOTONE_FEATURES)}): "
            f"{', '.join(sorted(unknown))} is not"
        )


def fit_plausibility(x: np.ndarray, pairs: Sequence[tuple[int, int]], config: CalibratorConfig) -> PlausibilityTerm:
    """The plausibility term: weights >= 0 on the standardised :attr:`~CalibratorConfig.plausibility_features`
    that maximise the L2-regularised likelihood that each pair's correct answer scores above its
    changed copy (the pair's own difference of features; whatever the question makes likely
    cancels, so no intercept)."""
    from scipy.optimize import minimize

    require_support("plausibility", config.plausibility_features)
    columns = [FEATURES.index(name) for name in config.plausibility_features]
    mean, scale = x[:, columns].mean(axis=0), x[:, columns].std(axis=0) + 1e-9
    z = (x[:, columns] - mean) / scale
    diff = np.array([z[right] - z[changed] for right, changed in pairs])
    ridge = 1.0 / (config.plausibility_strength * len(diff))

    def loss(coef: np.ndarray) -> tuple[float, np.ndarray]:
        margin = diff @ coef
        value = np.logaddexp(0, -margin).mean() + 0.5 * ridge * coef @ coef
        return value, -(diff.T @ _sigmoid(-margin)) / len(diff) + ridge * coef

    fit = minimize(loss, np.zeros(len(columns)), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * len(columns))
    return PlausibilityTerm(
        features=list(config.plausibility_features),
        mean=mean.tolist(),
        scale=scale.tolist(),
        coef=fit.x.tolist(),
        pairs=len(diff),
    )


def fit_gate(x: np.ndarray, constructed: np.ndarray, config: CalibratorConfig) -> tuple[RelevanceGate, np.ndarray]:
    """The relevance gate fitted on every row (labelled: belongs, constructed: does not), and its
    out-of-fold predictions. The two classes are weighted to ``1 - off_topic_share`` and
    ``off_topic_share`` of the total, so the number of constructed rows does not set the prior."""
    from sklearn.model_selection import StratifiedKFold

    belongs = (~constructed).astype(np.float64)
    columns = [FEATURES.index(name) for name in config.gate_features]
    folds = max(2, min(config.folds, int(constructed.sum()), int((~constructed).sum())))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    oof = _out_of_fold(
        belongs,
        split,
        lambda train, val: _fit_gate(x[train][:, columns], belongs[train], config).predict(x[val], FEATURES),
    )
    return _fit_gate(x[:, columns], belongs, config), oof


def _fit_gate(x: np.ndarray, belongs: np.ndarray, config: CalibratorConfig) -> RelevanceGate:
    """The gate's weighted logistic regression, every weight >= 0."""
    require_support("gate", config.gate_features)
    share = config.off_topic_share
    weight = np.where(belongs == 1, (1 - share) / belongs.sum(), share / (1 - belongs).sum())
    fit = bounded_logistic(x, belongs, weight, [True] * x.shape[1], config.gate_strength)
    return RelevanceGate(
        features=list(config.gate_features),
        mean=fit["mean"],
        scale=fit["scale"],
        coef=fit["coef"],
        intercept=fit["intercept"],
    )


def bounded_logistic(
    x: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None,
    non_negative: Sequence[bool],
    strength: float,
    unpenalised: Sequence[bool] | None = None,
) -> dict[str, object]:
    """L2 logistic regression on standardised columns, the weights of the ``non_negative`` columns
    kept >= 0 (L-BFGS-B bounds): mean, scale, coef and intercept, as :func:`standardised_logistic`.
    The weights of the ``unpenalised`` columns are left out of the L2 penalty, as the intercept is."""
    from scipy.optimize import minimize

    labels = labels.astype(np.float64)
    weight = np.full(len(labels), 1.0 / len(labels)) if weight is None else weight / weight.sum()
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = (x - mean) / scale
    ridge = np.full(z.shape[1], 1.0 / (strength * len(labels)))
    if unpenalised is not None:
        ridge[np.asarray(unpenalised, dtype=bool)] = 0.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = z @ theta[:-1] + theta[-1]
        residual = weight * (_sigmoid(logits) - labels)
        penalty = 0.5 * np.sum(ridge * theta[:-1] ** 2)
        value = np.sum(weight * (np.logaddexp(0, logits) - labels * logits)) + penalty
        return value, np.append(z.T @ residual + ridge * theta[:-1], residual.sum())

    bounds = [(0.0, None) if keep else (None, None) for keep in non_negative] + [(None, None)]
    theta = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds).x
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": theta[:-1].tolist(), "intercept": float(theta[-1])}


MONOTONE_LOGISTIC_FEATURES: tuple[str, ...] = MONOTONE_FEATURES
"""What the monotone logistic candidate reads besides the probe: the jurors' support only, each
weight >= 0. No format column and no interaction: on crosscheck_dev the format columns mostly
learn which source a row comes from (HaluEval's wrong answers are the long ones), which ranked
hand-written wrong answers above right ones."""


def fit_monotone_logistic(
    x: np.ndarray, labels: np.ndarray, strength: float, names: Sequence[str] = FEATURES
) -> Calibrator:
    """Logistic regression on :data:`MONOTONE_LOGISTIC_FEATURES` (and the probe's column when
    ``names`` has it) with non-negative weights on :data:`MONOTONE_FEATURES`; the other columns of
    ``names`` get weight 0. The probe's weight is left out of the L2 penalty: its logit is one
    score, fitted on as many rows as the candidate or more (``probe_rows``), and shrinking it with
    the jurors' columns let the chosen strength decide how much the probe counted (held-out AUROC
    0.54-0.68 across draws of the first start's rows; docs/decisions/jury-truthfulness-probe.md)."""
    used = [name for name in MONOTONE_LOGISTIC_FEATURES + (PROBE_FEATURE,) if name in names]
    columns = [list(names).index(name) for name in used]
    fit = bounded_logistic(
        x[:, columns],
        labels,
        None,
        [name in MONOTONE_FEATURES for name in used],
        strength,
        [name == PROBE_FEATURE for name in used],
    )
    mean, scale, coef = np.zeros(len(names)), np.ones(len(names)), np.zeros(len(names))
    mean[columns], scale[columns], coef[columns] = fit["mean"], fit["scale"], fit["coef"]
    return Calibrator(
        method="logistic", mean=mean.tolist(), scale=scale.tolist(), coef=coef.tolist(), intercept=fit["intercept"]
    )


def _cross_fitted_platt(p: np.ndarray, labels: np.ndarray, split: StratifiedKFold) -> np.ndarray:
    """Platt-scaled ``p``, each fold scaled by a fit on the other folds."""
    return _out_of_fold(labels, split, lambda train, val: platt_scaled(p[val], fit_platt(p[train], labels[train])))


def _out_of_fold(
    labels: np.ndarray, split: StratifiedKFold, predict: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Out-of-fold predictions: for each fold of ``split`` (a stratified splitter of ``labels``),
    ``predict(train, val)``, a fit on the other folds' indexes read on this fold's."""
    out = np.zeros(len(labels))
    for train, val in split.split(np.zeros((len(labels), 1)), labels):
        out[val] = predict(train, val)
    return out


def fit_isotonic(jury_pmi: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Isotonic regression of correctness on the jury PMI, increasing (:data:`MONOTONE_FEATURES`)."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.01, y_max=0.99, increasing=True).fit(jury_pmi, labels)
    return Calibrator(method="isotonic", iso_x=iso.X_thresholds_.tolist(), iso_y=iso.y_thresholds_.tolist())


def save_calibrator(calibrator: Calibrator, directory: Path) -> Path:
    """Write a new version (``vNNNN.json``) and point ``current`` at it, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.stem for p in directory.glob("v*.json"))
    number = int(existing[-1][1:]) + 1 if existing else 1
    calibrator.version = f"v{number:04d}"
    calibrator.created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    target = directory / f"{calibrator.version}.json"
    atomic_write(target, calibrator.model_dump_json(indent=2))
    atomic_write(directory / CURRENT_FILE, calibrator.version + "\n")
    return target


def load_calibrator(directory: Path) -> Calibrator:
    """The current calibrator; a clear MoseError when there is none or it is damaged."""
    pointer = directory / CURRENT_FILE
    if not pointer.is_file():
        raise UnavailableError(
            f"no cross-check calibrator in {directory}: train one with "
            "`mose crosscheck train --data ../shared/data/crosscheck_dev.jsonl`"
        )
    path = directory / f"{pointer.read_text().strip()}.json"
    try:
        payload = json.loads(path.read_text())
        probe_columns = [PROBE_FEATURE] if isinstance(payload, dict) and payload.get("probe") else []
        if isinstance(payload, dict) and payload.get("features") != list(FEATURES) + probe_columns:
            raise ServerError(
                f"cross-check calibrator {path} was trained on other features (an older mose?): "
                "retrain it with `mose crosscheck train`"
            )
        return Calibrator.model_validate(payload)
    except (OSError, ValueError) as exc:
        raise ServerError(
            f"cross-check calibrator {path} is missing or damaged ({type(exc).__name__}): "
            "retrain with `mose crosscheck train`"
        ) from None


FITTING_FILE = "fitting.json"
"""Written into the calibrator folder while a process fits the first calibrator for a server that
is already running (``mose up``); the jury answers 503 until the calibrator lands."""


class CalibratorFitting(BaseModel):
    """Who is fitting a calibrator for this folder, and since when."""

    model_config = ConfigDict(extra="forbid")

    since: float
    """Unix time the fit started."""
    host: str
    """Host name of the fitting process."""
    pid: int
    """Its process id."""

    def alive(self) -> bool:
        """False when the fitting process is known to be gone (same host, no such process)."""
        if self.host != socket.gethostname():
            return True  # another node's process cannot be checked from here
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def mark_fitting(directory: Path) -> None:
    """Record that this process is fitting a calibrator into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = CalibratorFitting(since=time.time(), host=socket.gethostname(), pid=os.getpid())
    atomic_write(directory / FITTING_FILE, marker.model_dump_json())


def clear_fitting(directory: Path) -> None:
    """Remove the fitting record (the fit finished, failed or was stopped)."""
    (directory / FITTING_FILE).unlink(missing_ok=True)


def fitting_in_progress(directory: Path) -> CalibratorFitting | None:
    """The fit under way for ``directory``, or None (no record, a damaged one, or its process gone)."""
    try:
        marker = CalibratorFitting.model_validate_json((directory / FITTING_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.alive() else None
