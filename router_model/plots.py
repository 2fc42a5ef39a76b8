"""Evaluation plots (matplotlib, optional extra ``mose[plots]``): confusion matrix, reliability
diagram and ROC curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from registry.errors import MoseError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoseError("--plots needs matplotlib: `.venv/bin/pip install -e '.[plots]'`") from None
    return plt


def confusion_plot(gold: Sequence[str], predicted: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true vertical; columns: predicted, incl. abstain)."""
    import numpy as np

    plt = _pyplot()
    rows = sorted(set(gold))
    cols = rows + sorted(set(predicted) - set(rows))
    counts = np.zeros((len(rows), len(cols)))
    for g, p in zip(gold, predicted):
        counts[rows.index(g), cols.index(p)] += 1
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(cols), 1 + 0.6 * len(rows)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("router confusion matrix (row share)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability_plot(bins: list[dict], ece: float, path: Path, title: str = "router reliability") -> Path:
    """Accuracy against mean confidence per confidence bin, with the diagonal."""
    plt = _pyplot()
    used = [b for b in bins if b["n"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(
        [b["low"] for b in used],
        [b["accuracy"] for b in used],
        width=[b["high"] - b["low"] for b in used],
        align="edge",
        alpha=0.6,
        edgecolor="black",
        label="accuracy per bin",
    )
    ax.plot(
        [b["confidence"] for b in used], [b["accuracy"] for b in used], "o-", color="C1", label="bin mean confidence"
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("calibrated confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def roc_plot(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path, title: str) -> Path:
    """One ROC curve per name from its (labels, scores), with its AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    for name, (labels, scores) in curves.items():
        if len(set(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(labels, scores):.2f}, n={len(labels)})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
