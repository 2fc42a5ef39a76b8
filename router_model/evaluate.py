"""Evaluate the current router on labelled rows, beside three baselines fitted in the same run.

Predicted and gold domains are compared at the vertical level (a sub-domain counts as its
taxonomy vertical). ``accuracy`` counts an abstention as wrong; ``accuracy_when_answered`` is
the precision over the rows the router did not abstain on; ``ece`` is measured on the
calibrated top probability against whether the top domain is right.

Baselines, fitted on the router's own training rows (``train.jsonl`` and
``validation.jsonl`` in its artifact) and scored on the same rows:
``nearest_centroid`` and ``knn`` (k=10, cosine) on mean-pooled, normalised all-MiniLM-L6-v2
embeddings (all 6 layers), and ``tfidf_logreg`` (word 1-2 grams, logistic regression).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router_model.artifact import TRAIN_ROWS, VALIDATION_ROWS
from router_model.calibration import expected_calibration_error, reliability_bins
from router_model.data import LabelledQuery, load_jsonl
from router_model.embedder import MiniLMEmbedder
from router_model.runtime import OnnxRouter

ABSTAIN = "__abstain__"
CONTRACT_KEYS = (
    "n", "accuracy", "macro_f1", "ece", "abstain_rate", "accuracy_when_answered",
    "per_source", "latency_ms", "batch_qps", "baselines",
)  # fmt: skip


def log(message: str) -> None:
    print(f"[router eval] {message}", file=sys.stderr, flush=True)


def measure_latency(router: OnnxRouter, queries: Sequence[str], samples: int = 300) -> dict:
    """Single-query latency (tokenise + ONNX Runtime + decision), ms, after a short warm-up."""
    chosen = [queries[i] for i in np.linspace(0, len(queries) - 1, min(samples, len(queries))).astype(int)]
    for query in chosen[:10]:
        router.route(query)
    times = []
    for query in chosen:
        started = time.perf_counter()
        router.route(query)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3), "p99": round(float(np.percentile(times, 99)), 3)}


def measure_batch(router: OnnxRouter, queries: Sequence[str]):
    """Route all queries in one ``route_batch`` call; returns (decisions, queries per second)."""
    router.route_batch(queries[:64])  # warm-up
    started = time.perf_counter()
    decisions = router.route_batch(queries)
    seconds = time.perf_counter() - started
    return decisions, len(queries) / seconds


def minilm_embeddings(queries: Sequence[str], cache_dir: Path | None, max_length: int = 128) -> np.ndarray:
    """:class:`MiniLMEmbedder`'s embeddings of ``queries``, cached on disk by content hash."""
    digest = hashlib.sha256("\n".join(queries).encode() + f"|{max_length}".encode()).hexdigest()[:24]
    cache = cache_dir / f"minilm-{digest}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    vectors = MiniLMEmbedder(max_length, progress="MiniLM embeddings (baselines)")(queries)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    return vectors


def baseline_predictions(
    train: Sequence[LabelledQuery], rows: Sequence[LabelledQuery], to_vertical, cache_dir: Path | None
) -> dict[str, list[str]]:
    """Vertical predicted by each baseline for each row."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    train_text = [row.query for row in train]
    test_text = [row.query for row in rows]
    train_y = np.array([to_vertical(row.domain) for row in train])
    train_emb = minilm_embeddings(train_text, cache_dir)
    test_emb = minilm_embeddings(test_text, cache_dir)

    classes = sorted(set(train_y))
    centroids = np.stack([train_emb[train_y == c].mean(0) for c in classes])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    centroid_pred = [classes[i] for i in (test_emb @ centroids.T).argmax(1)]

    knn = KNeighborsClassifier(n_neighbors=min(10, len(train)), metric="cosine").fit(train_emb, train_y)

    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    logreg = LogisticRegression(C=10.0, max_iter=2000).fit(tfidf.fit_transform(train_text), train_y)
    return {
        "nearest_centroid": centroid_pred,
        "knn": list(knn.predict(test_emb)),
        "tfidf_logreg": list(logreg.predict(tfidf.transform(test_text))),
    }


def per_source_accuracy(rows: Sequence[LabelledQuery], hits: Sequence[bool]) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits):
        groups[row.source].append(bool(hit))
    return {source: {"n": len(v), "accuracy": round(float(np.mean(v)), 4)} for source, v in sorted(groups.items())}


def evaluate(
    router: OnnxRouter,
    rows: Sequence[LabelledQuery],
    *,
    baselines: bool = True,
    cache_dir: Path | None = None,
    plots_dir: Path | None = None,
    latency_samples: int = 300,
) -> dict:
    """The evaluation report for ``rows``: the :data:`CONTRACT_KEYS`, plus ``baselines_per_source``
    and run details."""
    from sklearn.metrics import f1_score

    to_vertical = router.experts.vertical
    queries = [row.query for row in rows]
    gold = [to_vertical(row.domain) for row in rows]
    log(f"{len(rows)} rows; routing them in one batch")
    load_before = os.getloadavg()[0]
    decisions, qps = measure_batch(router, queries)
    log("single-query latency")
    latency = measure_latency(router, queries, latency_samples)
    # Timings on a shared machine depend on what else runs: record the load they were taken under.
    load = round(max(load_before, os.getloadavg()[0]), 2)
    top = [to_vertical(d.domain) for d in decisions]
    answered = np.array([not d.abstained for d in decisions])
    top_hit = np.array([p == g for p, g in zip(top, gold)])
    hits = top_hit & answered
    predicted = [p if a else ABSTAIN for p, a in zip(top, answered)]
    confidence = np.array([d.confidence for d in decisions])
    report = {
        "n": len(rows),
        "accuracy": round(float(hits.mean()), 4),
        "macro_f1": round(
            float(f1_score(gold, predicted, labels=sorted(set(gold)), average="macro", zero_division=0)), 4
        ),
        "ece": round(expected_calibration_error(confidence, top_hit), 4),
        "abstain_rate": round(float(1 - answered.mean()), 4),
        "accuracy_when_answered": round(float(top_hit[answered].mean()), 4) if answered.any() else 0.0,
        "per_source": per_source_accuracy(rows, hits),
        "latency_ms": latency,
        "batch_qps": round(qps, 1),
        "baselines": {},
        "router_version": router.version,
        "provider": router.provider,
        "onnx_file": router.graph_file,
        "load_average_1m": load,
        "cpu_count": os.cpu_count(),
    }
    if baselines:
        train = load_jsonl(router.directory / TRAIN_ROWS) + load_jsonl(router.directory / VALIDATION_ROWS)
        log(f"fitting baselines on the router's {len(train)} training rows")
        predictions = baseline_predictions(train, rows, to_vertical, cache_dir)
        report["baselines"] = {
            name: round(float(np.mean([p == g for p, g in zip(pred, gold)])), 4) for name, pred in predictions.items()
        }
        report["baselines_per_source"] = {
            name: per_source_accuracy(rows, [p == g for p, g in zip(pred, gold)]) for name, pred in predictions.items()
        }
    if plots_dir is not None:
        from router_model.plots import confusion_plot, reliability_plot

        plots_dir.mkdir(parents=True, exist_ok=True)
        report["plots"] = [
            str(confusion_plot(gold, predicted, plots_dir / "confusion_matrix.png")),
            str(reliability_plot(reliability_bins(confidence, top_hit), report["ece"], plots_dir / "reliability.png")),
        ]
    return report
