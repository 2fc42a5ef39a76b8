"""Turn a jury's evidence into P(correct), and choose the flag threshold.

Candidates: logistic regression on the evidence features (standardised; several L2 strengths),
or isotonic regression on the uncalibrated jury score alone. The one with the lowest
cross-validated log loss is refitted on every row. The flag threshold is the largest P(correct)
below which flagged answers are wrong with at least ``target_flag_precision``, on out-of-fold
predictions (validation metrics are out-of-fold too). Artifacts are versioned JSON under
``MOSE_HOME/crosscheck/`` (no pickles).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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

    seed: int = 0
    """Seed of the train/validation split."""


class Calibrator(BaseModel):
    """A fitted calibrator: plain numbers, so it saves as JSON and loads anywhere."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["logistic", "isotonic"]
    features: list[str] = Field(default_factory=lambda: list(FEATURES))
    mean: list[float] = Field(default_factory=list)
    scale: list[float] = Field(default_factory=list)
    coef: list[float] = Field(default_factory=list)
    intercept: float = 0.0
    iso_x: list[float] = Field(default_factory=list)
    iso_y: list[float] = Field(default_factory=list)
    threshold: float = 0.5
    """Flag when P(correct) is below this."""
    metrics: dict[str, float] = Field(default_factory=dict)
    trained_on: dict[str, object] = Field(default_factory=dict)
    version: str = ""
    created_at: str = ""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(correct) for each row of the feature matrix ``x`` (columns in :data:`FEATURES` order)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if self.method == "logistic":
            z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
            logits = z @ np.asarray(self.coef) + self.intercept
            return 1.0 / (1.0 + np.exp(-np.clip(logits, -40, 40)))
        score = x[:, self.features.index("jury_pmi")]
        return np.interp(score, np.asarray(self.iso_x), np.asarray(self.iso_y))


def fit_logistic(x: np.ndarray, labels: np.ndarray, strength: float) -> Calibrator:
    """L2-regularised logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    model = LogisticRegression(C=strength, max_iter=5000).fit((x - mean) / scale, labels)
    return Calibrator(method="logistic", mean=mean.tolist(), scale=scale.tolist(), coef=model.coef_[0].tolist(),
                      intercept=float(model.intercept_[0]))


def fit_calibrator(x: np.ndarray, labels: np.ndarray, config: CalibratorConfig | None = None) -> Calibrator:
    """Choose the candidate (logistic at each strength, isotonic) by cross-validated log loss,
    refit it on every row, and set the flag threshold on its out-of-fold predictions."""
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    config = config or CalibratorConfig()
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) < 20 or min(np.bincount(labels, minlength=2)) < 2:
        raise MoseError("calibration needs at least 20 labelled rows with both correct and wrong answers")
    pmi = FEATURES.index("jury_pmi")
    candidates = {f"logistic C={c:g}": (lambda xs, ys, c=c: fit_logistic(xs, ys, c)) for c in config.regularisation}
    candidates["isotonic"] = lambda xs, ys: fit_isotonic(xs[:, pmi], ys)
    folds = StratifiedKFold(n_splits=min(config.folds, int(min(np.bincount(labels)))), shuffle=True,
                            random_state=config.seed)
    out_of_fold = {name: np.zeros(len(labels)) for name in candidates}
    for train, val in folds.split(x, labels):
        for name, fit in candidates.items():
            out_of_fold[name][val] = fit(x[train], labels[train]).predict(x[val])
    losses = {name: log_loss(labels, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1]) for name, p in out_of_fold.items()}
    chosen = min(losses, key=losses.get)
    best = candidates[chosen](x, labels)

    p_oof = out_of_fold[chosen]
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
    }
    best.trained_on = {"candidate": chosen}
    return best


def fit_isotonic(jury_pmi: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Isotonic regression of correctness on the jury PMI, in whichever direction the data shows
    (pooled over sources, PMI can run against correctness)."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.01, y_max=0.99, increasing="auto").fit(jury_pmi, labels)
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
        if isinstance(payload, dict) and payload.get("features") != list(FEATURES):
            raise MoseError(f"cross-check calibrator {path} was trained on other features (an older mose?): "
                            "retrain it with `mose crosscheck train`")
        return Calibrator.model_validate(payload)
    except (OSError, ValueError) as exc:
        raise MoseError(f"cross-check calibrator {path} is missing or damaged ({type(exc).__name__}): "
                        "retrain with `mose crosscheck train`") from None
