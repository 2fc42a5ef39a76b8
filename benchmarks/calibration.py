"""Calibrator benchmark on saved jury evidence: is the fitting procedure calibrated on unseen rows?

    .venv/bin/mose crosscheck train --data ../shared/data/crosscheck_dev.jsonl --limit 600 --seed 7 \\
        --save-evidence train.jsonl
    .venv/bin/mose crosscheck eval --data ../shared/data/crosscheck_dev.jsonl --limit 300 --seed 0 --json \\
        --save-evidence heldout.jsonl
    .venv/bin/python benchmarks/calibration.py --train train.jsonl --heldout heldout.jsonl [--json FILE]

No model runs: everything is fitted on the saved evidence (seconds to a minute per fit). Side by
side in one run, for the default fit and each option of :class:`jury.calibrator.CalibratorConfig`
that targets calibration (Platt scaling, the fold-averaged probe):

- nested cross-validation on the training rows alone: the whole fit (probe, candidate choice,
  threshold) runs inside each outer fold and predicts the rows it left out, so ECE, log loss and
  flag precision are those of the procedure on rows like the training rows it never saw; beside
  ECE, the ECE that exactly calibrated probabilities would show on as many rows;
- the held-out rows (another draw, never trained on): the same figures, each option fitted on
  every training row.

Choose an option by the nested figures (training rows only); the held-out column then says how it
reads on rows of another draw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import print_table, write_json  # noqa: E402

OPTIONS: dict[str, dict[str, bool]] = {
    "default": {},
    "--recalibrate": {"recalibrate": True},
    "--average-probe-folds": {"probe_average_folds": True},
    "both": {"recalibrate": True, "probe_average_folds": True},
}


def load(path: str, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, answer states) of saved evidence, features recomputed as `train` does."""
    from jury.crosscheck import answer_states, matrix, saved_evidence

    evidence = [item for _, item in saved_evidence(path)]
    for item in evidence:
        item.refresh_values()
    return matrix(evidence), np.array([e.row.label for e in evidence]), answer_states(evidence, layer)


def predict(calibrator, x: np.ndarray, states: np.ndarray) -> np.ndarray:
    return calibrator.predict(np.column_stack([x, calibrator.probe.logits(states)]))


def figures(p: np.ndarray, labels: np.ndarray, threshold: np.ndarray | float) -> dict[str, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    from jury.crosscheck import ece_if_calibrated
    from router_model.calibration import expected_calibration_error

    flagged = p < threshold
    return {
        "auroc": roc_auc_score(labels, p),
        "log_loss": log_loss(labels, p),
        "ece": expected_calibration_error(p, labels),
        "ece_exact": ece_if_calibrated(p)["mean"],
        "flag_precision": float((labels[flagged] == 0).mean()) if flagged.any() else float("nan"),
    }


def nested(x, labels, states, config, folds: int, seed: int) -> tuple[dict[str, float], list[float]]:
    """The procedure's figures on the outer folds' rows, and each outer fit's Platt slope."""
    from sklearn.model_selection import StratifiedKFold

    from jury.calibrator import fit_calibrator

    p, threshold, slopes = np.zeros(len(labels)), np.zeros(len(labels)), []
    for train, val in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        calibrator = fit_calibrator(x[train], labels[train], config, states[train])
        p[val], threshold[val] = predict(calibrator, x[val], states[val]), calibrator.threshold
        if calibrator.recalibration:
            slopes.append(calibrator.recalibration[0])
    return figures(p, labels, threshold), slopes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="evidence saved by `crosscheck train --save-evidence`")
    parser.add_argument("--heldout", required=True, help="evidence saved by `crosscheck eval --save-evidence`")
    parser.add_argument("--seed", type=int, default=7, help="the calibrator's seed (`train --seed`; default 7)")
    parser.add_argument("--outer-folds", type=int, default=5, help="outer folds of the nested cross-validation")
    parser.add_argument("--probe-layer", type=int, default=20, help="layer of the saved answer states (default 20)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from tqdm import tqdm

    from jury.calibrator import CalibratorConfig, fit_calibrator

    x, labels, states = load(args.train, args.probe_layer)
    hx, hlabels, hstates = load(args.heldout, args.probe_layer)
    rows, results = [], {}
    for name, option in tqdm(OPTIONS.items(), desc="fits", unit="option", file=sys.stderr):
        config = CalibratorConfig(seed=args.seed, probe_layer=args.probe_layer, **option)
        inner, slopes = nested(x, labels, states, config, args.outer_folds, seed=99)
        calibrator = fit_calibrator(x, labels, config, states)
        held = figures(predict(calibrator, hx, hstates), hlabels, calibrator.threshold)
        slopes_note = f"Platt slopes {min(slopes):.2f}-{max(slopes):.2f}" if slopes else ""
        rows.append((f"{name}, nested CV (training rows)", _cells(inner), slopes_note))
        rows.append(
            (
                f"{name}, held-out rows",
                _cells(held),
                f"fitted on every training row: {calibrator.trained_on['candidate']}",
            )
        )
        results[name] = {
            "nested_cv": inner,
            "heldout": held,
            "platt_slopes": slopes,
            "candidate": calibrator.trained_on["candidate"],
        }
    print_table(
        f"Calibrator on saved evidence: nested {args.outer_folds}-fold CV on {len(labels)} training rows, "
        f"{len(hlabels)} held-out rows; AUROC / log loss / ECE (if exactly calibrated) / flag precision",
        rows,
    )
    write_json(
        args.json,
        {
            "training_rows": len(labels),
            "heldout_rows": len(hlabels),
            "outer_folds": args.outer_folds,
            "seed": args.seed,
            "options": results,
        },
    )


def _cells(f: dict[str, float]) -> str:
    return f"{f['auroc']:.3f} / {f['log_loss']:.4f} / {f['ece']:.3f} ({f['ece_exact']:.3f}) / {f['flag_precision']:.2f}"


if __name__ == "__main__":
    main()
