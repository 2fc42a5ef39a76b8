"""Temperature scaling, expected calibration error and the abstain threshold."""

from __future__ import annotations

import numpy as np


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017)."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(error)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Per bin: lower/upper edge, mean confidence, accuracy, count (for the reliability diagram)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        in_bin = which == b
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "confidence": float(confidence[in_bin].mean()) if in_bin.any() else None,
                "accuracy": float(np.asarray(correct)[in_bin].mean()) if in_bin.any() else None,
                "n": int(in_bin.sum()),
            }
        )
    return out


def choose_threshold(
    confidence: np.ndarray, correct: np.ndarray, target: float, floor: float, weight: np.ndarray | None = None
) -> float:
    """Smallest threshold whose answered rows (confidence >= threshold) reach ``target``
    precision, never below ``floor``; the most precise threshold when none reaches it. ``weight``:
    how much each row counts (default: all alike)."""
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    weight = np.ones(len(conf)) if weight is None else np.asarray(weight, dtype=np.float64)[order]
    hits = np.cumsum(weight * np.asarray(correct, dtype=np.float64)[order])
    precision = hits / np.cumsum(weight)
    # Only cut between distinct confidences: rows tied with the cut are answered together.
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]
    ok = np.flatnonzero((precision >= target) & last_of_tie)
    if ok.size:
        threshold = float(conf[ok.max()])
    else:
        threshold = float(conf[np.argmax(np.where(last_of_tie, precision, -1))])
    return max(threshold, floor)
