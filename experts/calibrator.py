"""Turn a jury's evidence into P(correct), and choose the flag threshold.

Candidates: logistic regression on the evidence features (standardised; several L2 strengths),
shallow gradient-boosted trees on the evidence and format features (they find, without being
told, that the same evidence means different things for short answers, long responses and short
questions), or isotonic regression on the uncalibrated jury score alone. The one with the lowest
cross-validated log loss is refitted on every row. The flag threshold is the largest P(correct)
below which flagged answers are wrong with at least ``target_flag_precision``, on out-of-fold
predictions (validation metrics are out-of-fold too). Artifacts are versioned JSON under
``MOSE_HOME/crosscheck/`` (no pickles).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from experts.probe import Probe, fit_probe, standardised_logistic
from registry.artifacts import atomic_write
from registry.errors import MoseError
from router_model.calibration import choose_threshold, expected_calibration_error

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

FEATURES: tuple[str, ...] = (
    EVIDENCE_FEATURES + FORMAT_FEATURES
    + tuple(f"{name}_x_long" for name in EVIDENCE_FEATURES)
    + tuple(f"{name}_x_log_answer_tokens" for name in EVIDENCE_FEATURES)
)
"""Columns the calibrator sees, in order (see :func:`experts.jury.features`); the interactions let
a linear model weigh evidence differently for short answers and long responses."""

PROBE_FEATURE = "base_probe"
"""The column a calibrator with a truthfulness probe (:mod:`experts.probe`) has after
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

    boosted_trees: int = Field(100, ge=0)
    """Trees of the gradient-boosted candidate (0 leaves it out). Measured on 500 held-out rows
    (797 training rows): 100 trees of depth 2 at rate 0.05 reached AUROC 0.656 where the logistic
    model reached 0.630 (but with a higher log loss); 300 trees overfitted."""

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
    probe reads (:mod:`experts.probe`); None: no probe. On SmolLM2-135M layers 18-22 read best on
    the training rows' cross-validation; 20 is where the demo experts' adapters begin (the
    shared trunk's output: no layer runs for it)."""

    probe_strengths: tuple[float, ...] = Field((0.001, 0.003, 0.01), min_length=1)
    """Inverse L2 strengths tried for the probe's logistic regression on its 576 standardised
    inputs (strong regularisation: a few thousand rows); the best by cross-validated log loss is kept."""

    probe_average_folds: bool = False
    """The probe kept is the mean of its cross-validation folds' probes (whose out-of-fold logits
    the calibrator learnt from) instead of a refit on every row, which reads new rows more sharply
    than the calibrator expects."""

    recalibrate: bool = False
    """Platt scaling after the chosen candidate: a logistic fit of the labels on its out-of-fold
    log-odds (slope, offset), applied to the refitted candidate, as scikit-learn's
    ``CalibratedClassifierCV(method="sigmoid", ensemble=False)``. Corrects a fitting procedure that
    is systematically over- or under-confident on rows it did not see."""


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


class Calibrator(BaseModel):
    """A fitted calibrator: plain numbers, so it saves as JSON and loads anywhere."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["logistic", "boosted", "isotonic"]
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
    metrics: dict[str, float] = Field(default_factory=dict)
    trained_on: dict[str, object] = Field(default_factory=dict)
    version: str = ""
    created_at: str = ""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(correct) for each row of the feature matrix ``x`` (columns in :attr:`features` order)."""
        p = self._candidate_predict(np.atleast_2d(np.asarray(x, dtype=np.float64)))
        if self.recalibration is None:
            return p
        slope, offset = self.recalibration
        return _sigmoid(slope * _logit(p) + offset)

    def _candidate_predict(self, x: np.ndarray) -> np.ndarray:
        if self.method == "logistic":
            z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
            logits = z @ np.asarray(self.coef) + self.intercept
            return _sigmoid(logits)
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


def fit_platt(p: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(slope, offset) of Platt scaling: unregularised logistic regression of ``labels`` on the
    log-odds of ``p``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p)[:, None], labels)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


TREE_FEATURES: tuple[str, ...] = EVIDENCE_FEATURES + FORMAT_FEATURES
"""What the boosted trees see: the interactions of :data:`FEATURES` are theirs to find."""


MONOTONE_FEATURES: tuple[str, ...] = ("jury_pmi", "jury_logp_given", "contrast_pmi", "contrast_logp_given",
                                      "contrast_logp_given_max", "agreement")
"""Support for the answer from the experts who read the question: with everything else equal, more
of it must not lower P(correct). The boosted trees are constrained to it, the isotonic candidate is
increasing, and a logistic candidate that breaks it on the training rows is not chosen."""


def fit_boosted(x: np.ndarray, labels: np.ndarray, config: CalibratorConfig,
                names: Sequence[str] = FEATURES) -> Calibrator:
    """Gradient-boosted trees (scikit-learn's histogram boosting, log loss) on :data:`TREE_FEATURES`
    (and the probe's column when ``names``, the columns of ``x``, have it), increasing in
    :data:`MONOTONE_FEATURES`, stored as plain arrays."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    seen = [name for name in TREE_FEATURES + (PROBE_FEATURE,) if name in names]
    columns = [list(names).index(name) for name in seen]
    model = HistGradientBoostingClassifier(
        max_iter=config.boosted_trees, max_depth=config.boosted_depth, learning_rate=config.boosted_learning_rate,
        min_samples_leaf=config.boosted_min_leaf, early_stopping=False, random_state=config.seed,
        monotonic_cst=[1 if name in MONOTONE_FEATURES else 0 for name in seen])
    model.fit(x[:, columns], labels)
    trees = []
    for (predictor,) in model._predictors:  # one tree per iteration for a binary task
        nodes = predictor.nodes
        leaf = nodes["is_leaf"].astype(bool)
        trees.append(Tree(feature=nodes["feature_idx"].tolist(), threshold=nodes["num_threshold"].tolist(),
                          left=np.where(leaf, -1, nodes["left"].astype(np.int64)).tolist(),
                          right=np.where(leaf, -1, nodes["right"].astype(np.int64)).tolist(),
                          value=nodes["value"].tolist()))
    # leaf values already carry the learning rate; the trees start from the baseline log-odds
    return Calibrator(method="boosted", columns=columns, trees=trees, learning_rate=1.0,
                      intercept=float(np.ravel(model._baseline_prediction)[0]))


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
    """True when raising any of :data:`MONOTONE_FEATURES` by ``delta`` lowers P(correct) on no row of ``x``."""
    p = calibrator.predict(x)
    return all(np.all(calibrator.predict(raise_support(x, calibrator.features, feature, delta)) >= p - 1e-9)
               for feature in MONOTONE_FEATURES if feature in calibrator.features)


def fit_logistic(x: np.ndarray, labels: np.ndarray, strength: float) -> Calibrator:
    """L2-regularised logistic regression on standardised features."""
    return Calibrator(method="logistic", **standardised_logistic(x, labels, strength))


def fit_calibrator(x: np.ndarray, labels: np.ndarray, config: CalibratorConfig | None = None,
                   states: np.ndarray | None = None) -> Calibrator:
    """Choose the candidate (logistic at each strength, boosted trees, isotonic) by
    cross-validated log loss, refit it on every row, and set the flag threshold on its
    out-of-fold predictions.

    ``x``: the :data:`FEATURES` columns. ``states`` (the base model's answer states at
    ``config.probe_layer``, one row each): a truthfulness probe is fitted first, and its
    out-of-fold logits join the features as :data:`PROBE_FEATURE`.
    """
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    config = config or CalibratorConfig()
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) < 20 or min(np.bincount(labels, minlength=2)) < 2:
        raise MoseError("calibration needs at least 20 labelled rows with both correct and wrong answers")
    folds = min(config.folds, int(min(np.bincount(labels))))
    names, probe = list(FEATURES), None
    if states is not None:
        if config.probe_layer is None:
            raise MoseError("answer states were given but probe_layer is None")
        probe, probe_logits = fit_probe(states, labels, config.probe_layer, config.probe_strengths, folds,
                                        config.seed, config.probe_average_folds)
        x, names = np.column_stack([x, probe_logits]), names + [PROBE_FEATURE]
    pmi = FEATURES.index("jury_pmi")
    candidates = {f"logistic C={c:g}": (lambda xs, ys, c=c: fit_logistic(xs, ys, c)) for c in config.regularisation}
    if config.boosted_trees:
        candidates["boosted"] = lambda xs, ys: fit_boosted(xs, ys, config, names)
    candidates["isotonic"] = lambda xs, ys: fit_isotonic(xs[:, pmi], ys)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    out_of_fold = {name: np.zeros(len(labels)) for name in candidates}
    for train, val in split.split(x, labels):
        for name, fit in candidates.items():
            out_of_fold[name][val] = fit(x[train], labels[train]).predict(x[val])
    losses = {name: log_loss(labels, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1]) for name, p in out_of_fold.items()}
    for chosen in sorted(losses, key=losses.get):  # the best candidate that keeps MONOTONE_FEATURES' direction
        best = candidates[chosen](x, labels)
        best.features, best.probe = names, probe
        if is_monotone(best, x):
            break

    p_oof = out_of_fold[chosen]
    recalibrated_loss = None
    if config.recalibrate:
        best.recalibration = fit_platt(p_oof, labels)
        p_oof = _cross_fitted_platt(p_oof, labels, split)  # the metrics stay out-of-fold
        recalibrated_loss = log_loss(labels, np.clip(p_oof, 1e-6, 1 - 1e-6), labels=[0, 1])
    flag_cut = choose_threshold(1.0 - p_oof, labels == 0, config.target_flag_precision,
                                1.0 - config.max_flag_probability)
    best.threshold = float(1.0 - flag_cut)
    best.metrics = {
        "validation_log_loss": float(losses[chosen]),
        "validation_log_loss_isotonic": float(losses["isotonic"]),
        "validation_auroc": float(roc_auc_score(labels, p_oof)),
        "validation_ece": expected_calibration_error(p_oof, labels),
        "train_rows": float(len(labels)),
        "validation_rows": float(len(labels)),
        **{f"cv_log_loss {name}": float(loss) for name, loss in losses.items()},
    }
    if recalibrated_loss is not None:
        best.metrics["validation_log_loss_recalibrated"] = float(recalibrated_loss)
    if probe is not None:
        best.metrics["probe_validation_auroc"] = float(roc_auc_score(labels, probe_logits))
        best.voter = fit_calibrator(x[:, : len(FEATURES)], labels, config)
    best.trained_on = {"candidate": chosen}
    return best


def _cross_fitted_platt(p: np.ndarray, labels: np.ndarray, split) -> np.ndarray:
    """Platt-scaled ``p``, each fold scaled by a fit on the other folds."""
    scaled = np.zeros(len(p))
    for train, val in split.split(p[:, None], labels):
        slope, offset = fit_platt(p[train], labels[train])
        scaled[val] = _sigmoid(slope * _logit(p[val]) + offset)
    return scaled


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
        raise MoseError(f"no cross-check calibrator in {directory}: train one with "
                        "`mose crosscheck train --data ../shared/data/crosscheck_dev.jsonl`")
    path = directory / f"{pointer.read_text().strip()}.json"
    try:
        payload = json.loads(path.read_text())
        probe_columns = [PROBE_FEATURE] if isinstance(payload, dict) and payload.get("probe") else []
        if isinstance(payload, dict) and payload.get("features") != list(FEATURES) + probe_columns:
            raise MoseError(f"cross-check calibrator {path} was trained on other features (an older mose?): "
                            "retrain it with `mose crosscheck train`")
        return Calibrator.model_validate(payload)
    except (OSError, ValueError) as exc:
        raise MoseError(f"cross-check calibrator {path} is missing or damaged ({type(exc).__name__}): "
                        "retrain with `mose crosscheck train`") from None
