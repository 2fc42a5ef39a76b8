"""Training and evaluating the cross-check calibrator on labelled question/answer rows.

Rows (JSONL): ``question``, ``answer``, ``label`` (1 correct, 0 wrong), optional ``source``,
``domain``, ``id``. Honesty rules: training uses only rows whose id hashes into the *train*
bucket; the calibrator records the digests of the rows it saw, and evaluation skips any of them,
so the figures always come from rows the calibrator never saw. ``--limit`` samples N rows per
source with a seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from experts.types import BASE_EXPERT
from jury.calibrator import CHECK_FEATURES, FEATURES, Calibrator, CalibratorConfig, fit_calibrator
from jury.checks import text_checks
from jury.jury import JurorEvidence, Jury, features
from jury.negatives import PERTURBED, NegativesConfig, constructed_negatives, is_constructed, origin_digest
from registry.errors import MoseError
from router_model.calibration import expected_calibration_error

TEST_BUCKETS = 3
"""Rows whose id hashes into buckets 0..2 of 10 are never used for training (30 % held out)."""


class CheckRow(BaseModel):
    """One labelled answer."""

    model_config = ConfigDict(extra="ignore")

    question: str
    answer: str
    label: int
    source: str = "unknown"
    domain: str | None = None
    id: str | None = None

    def digest(self) -> str:
        key = self.id or f"{self.question}\x00{self.answer}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def origin(self) -> str:
        """The digest of the labelled row this row was made from (:mod:`jury.negatives`), else its own."""
        return origin_digest(self) or self.digest()

    def is_test(self) -> bool:
        """In the held-out bucket: by the hash of the row, or of the row a constructed row was made
        from (a wrong answer made from a test row is a test row too)."""
        return int(self.origin(), 16) % 10 < TEST_BUCKETS


class RowEvidence(BaseModel):
    """The jury's evidence on one row, ready for the calibrator."""

    row: CheckRow
    jurors: list[JurorEvidence]
    values: dict[str, float]
    seconds: float
    jury_size: int | None = None
    """The first ``jury_size`` jurors formed the jury; the rest observed (baselines). None: all."""
    adapters_read_question: bool = True
    """How the jurors scored (:attr:`jury.jury.JuryConfig.adapters_read_question`)."""
    state_layer: int | None = None
    """The base model's layer ``answer_state`` was read at (None: not kept)."""
    answer_state: list[float] | None = None
    """The base model's mean hidden state over the answer, for the truthfulness probe."""

    def has_state(self, layer: int) -> bool:
        return self.answer_state is not None and self.state_layer == layer

    def refresh_values(self) -> None:
        """Recompute :attr:`values` from the jury's evidence with the current features, so evidence
        saved before a feature change stays usable."""
        checks = text_checks(self.row.question, self.row.answer)
        self.values = features(self.jurors[: self.jury_size or len(self.jurors)], self.row.question, checks, None)


def with_negatives(rows: Sequence[CheckRow], config: NegativesConfig | None) -> list[CheckRow]:
    """``rows`` and the wrong answers constructed from them (:mod:`jury.negatives`; none when
    ``config`` is None). Pass training rows when training and evaluated rows when evaluating:
    nothing is ever made from rows on the other side."""
    return list(rows) + (constructed_negatives(rows, config) if config is not None else [])


def negatives_mix(rows: Sequence[CheckRow]) -> dict[str, int]:
    """How many rows of each kind: labelled, answers swapped within a source, across domains, perturbed."""
    mix = {"labelled": 0, "swapped": 0, "swapped_cross": 0, "perturbed": 0}
    for row in rows:
        if not is_constructed(row.source):
            mix["labelled"] += 1
        elif row.source == "swapped_cross":
            mix["swapped_cross"] += 1
        else:
            mix[row.source.split("_", 1)[0]] += 1
    return mix


def _jsonl_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, line) of each non-blank line; a file that cannot be read is a MoseError."""
    try:
        # split on "\n" only: splitlines() would also cut at U+2028 inside JSON strings.
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise MoseError(f"cannot read {path}: {exc.strerror}") from None
    return [(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def load_rows(path: str | Path) -> list[CheckRow]:
    """Read labelled rows; a bad line is reported with its number."""
    rows = []
    for number, line in _jsonl_lines(path):
        try:
            row = CheckRow.model_validate_json(line)
        except ValidationError as exc:
            raise MoseError(
                f"{path}:{number}: not a labelled row ({exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
            ) from None
        if row.label not in (0, 1):
            raise MoseError(f"{path}:{number}: label must be 1 (correct) or 0 (wrong), got {row.label}")
        rows.append(row)
    if not rows:
        raise MoseError(f"{path} has no rows")
    return rows


def stratified_sample(rows: Sequence[CheckRow], per_source: int | None, seed: int) -> list[CheckRow]:
    """Up to ``per_source`` rows of each source, drawn with ``seed`` (all rows when None).

    Inside a source, correct and wrong answers are drawn in the source's own proportion
    (largest remainder), not left to chance: with 60 rows the share of correct answers of a
    plain random draw varies by +-0.06, which shows up as miscalibration in the calibrator
    trained on it and in the ECE measured on it."""
    if per_source is None:
        return list(rows)
    by_source: dict[str, list[CheckRow]] = defaultdict(list)
    for row in rows:
        by_source[row.source].append(row)
    rng = random.Random(seed)
    sample = []
    for source in sorted(by_source):
        group = by_source[source]
        by_label = {label: [row for row in group if row.label == label] for label in (0, 1)}
        counts = proportional_counts(
            {label: len(members) for label, members in by_label.items()}, min(per_source, len(group))
        )
        for label in (0, 1):
            sample.extend(rng.sample(by_label[label], counts[label]))
    return sample


def training_sample(
    rows: Sequence[CheckRow], per_source: int | None, probe_per_source: int, seed: int, negatives: bool = True
) -> tuple[list[CheckRow], list[CheckRow]]:
    """What a calibrator is fitted on, from ``rows``' train bucket: up to ``per_source`` rows of
    each source (:func:`stratified_sample`) with the wrong answers constructed from them (none
    without ``negatives``), for the jury to score; and up to ``probe_per_source`` other rows of
    each source for the truthfulness probe alone (see :func:`train`)."""
    labelled = [r for r in rows if not r.is_test()]
    sampled = stratified_sample(labelled, per_source, seed)
    taken = {row.digest() for row in sampled}
    rest = [r for r in labelled if r.digest() not in taken]
    probe_rows = stratified_sample(rest, probe_per_source, seed) if probe_per_source > 0 else []
    return with_negatives(sampled, NegativesConfig(seed=seed) if negatives else None), probe_rows


def proportional_counts(sizes: dict[int, int], total: int) -> dict[int, int]:
    """``total`` split across groups in proportion to ``sizes`` (largest remainder method)."""
    quota = {key: total * size / sum(sizes.values()) for key, size in sizes.items()}
    counts = {key: int(share) for key, share in quota.items()}
    by_remainder = sorted(quota, key=lambda key: quota[key] - counts[key], reverse=True)
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def collect(
    jury: Jury,
    rows: Sequence[CheckRow],
    k: int | None = None,
    extra: Sequence[str] = (),
    progress: bool = True,
    chunk: int = 48,
    state_layer: int | None = None,
) -> list[RowEvidence]:
    """Jury evidence for every row (``extra`` experts are scored too, outside the jury), with the
    base model's answer state at ``state_layer`` (default: the layer the jury's probe reads).

    Rows go through in chunks: one batched routing call and packed scoring passes per chunk
    (48 rows pack short answers ~5 % faster than 16; the passes stay within the pool's budget).
    """
    layer = jury.state_layer if state_layer is None else state_layer
    out: list[RowEvidence] = []
    bar = tqdm(total=len(rows), desc="cross-check evidence", unit="row", disable=not progress, file=sys.stderr)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        started = time.perf_counter()
        juries = jury.select_many([row.question for row in part], k)
        panels = [jurors + [(name, None) for name in extra if name not in {n for n, _ in jurors}] for jurors in juries]
        evidence = jury.evidence_many(
            [(row.question, row.answer[: jury.config.max_answer_chars], panel) for row, panel in zip(part, panels)],
            layer,
        )
        seconds = (time.perf_counter() - started) / len(part)
        for row, jurors, found in zip(part, juries, evidence):
            in_jury = found[: len(jurors)]  # observers' evidence is kept for the baselines only
            state = next(j.answer_state for j in found if j.expert == BASE_EXPERT)
            out.append(
                RowEvidence(
                    row=row,
                    jurors=found,
                    values=features(
                        in_jury,
                        row.question,
                        text_checks(row.question, row.answer[: jury.config.max_answer_chars]),
                        None,
                    ),
                    seconds=seconds,
                    jury_size=len(jurors),
                    adapters_read_question=jury.adapters_read_question,
                    state_layer=layer if state is not None else None,
                    answer_state=state,
                )
            )
        bar.update(len(part))
    bar.close()
    return out


def matrix(evidence: Sequence[RowEvidence]) -> np.ndarray:
    return np.array([[e.values[f] for f in FEATURES] for e in evidence], dtype=np.float64)


def check_matrix(rows: Sequence[CheckRow]) -> np.ndarray:
    """The :data:`~jury.calibrator.CHECK_FEATURES` columns of ``rows``, read from their text alone."""
    outcomes = [text_checks(r.question, r.answer) for r in rows]
    return np.array([[o[c] for c in CHECK_FEATURES] for o in outcomes], dtype=np.float64).reshape(
        len(rows), len(CHECK_FEATURES)
    )


def answer_states(evidence: Sequence[RowEvidence], layer: int) -> np.ndarray:
    """The base model's answer states at ``layer``, one row per item; a clear error when some
    evidence was collected without them (or at another layer)."""
    missing = sum(not e.has_state(layer) for e in evidence)
    if missing:
        raise MoseError(
            f"{missing} of {len(evidence)} rows of evidence have no base-model answer state at layer "
            f"{layer} (collected without one, or at another layer): collect them again, or train "
            "without the probe (--no-probe)"
        )
    return np.array([e.answer_state for e in evidence], dtype=np.float64)


def fill_answer_states(jury: Jury, evidence: Sequence[RowEvidence], layer: int, progress: bool = True) -> int:
    """Give evidence saved without the base model's answer state at ``layer`` (before the probe
    existed, or at another layer) that state, in place (:func:`probe_states`: the base model's
    lower layers only). Returns the rows filled."""
    todo = [e for e in evidence if not e.has_state(layer)]
    if todo:
        states = probe_states(jury, [e.row for e in todo], layer, progress, desc="answer states")
        for item, state in zip(todo, states):
            item.answer_state, item.state_layer = state.tolist(), layer
    return len(todo)


def probe_states(
    jury: Jury, rows: Sequence[CheckRow], layer: int, progress: bool = True, desc: str = "probe states", chunk: int = 96
) -> np.ndarray:
    """The base model's answer states at ``layer`` for ``rows`` alone, without the jury's evidence
    (:meth:`experts.pool.ExpertPool.answer_states`): more rows for the truthfulness probe at a
    fraction of the jury's cost per row."""
    texts = [(r.question, r.answer[: jury.config.max_answer_chars]) for r in rows]
    # by length across chunks, so each chunk's passes pack rows of about one width
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]) + len(texts[i][1]))
    out: list[np.ndarray | None] = [None] * len(texts)
    bar = tqdm(total=len(rows), desc=f"{desc} (layer {layer})", unit="row", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        for i, state in zip(part, jury.pool.answer_states([texts[i] for i in part], layer)):
            out[i] = np.asarray(state, dtype=np.float64)
        bar.update(len(part))
    bar.close()
    return np.array(out, dtype=np.float64).reshape(len(rows), -1)


def calibrator_inputs(calibrator: Calibrator, evidence: Sequence[RowEvidence]) -> np.ndarray:
    """The columns ``calibrator`` reads: :data:`FEATURES`, then its probe's logit if it has one."""
    x = matrix(evidence)
    if calibrator.probe is None:
        return x
    return np.column_stack([x, calibrator.probe.logits(answer_states(evidence, calibrator.probe.layer))])


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) > 1 else float("nan")


def best_single_expert(evidence: Sequence[RowEvidence], min_rows: int = 20) -> str | None:
    """The non-base juror whose PMI alone ranks the training rows best."""
    per_expert: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for item in evidence:
        for juror in item.jurors:
            if juror.expert != BASE_EXPERT:
                per_expert[juror.expert][0].append(item.row.label)
                per_expert[juror.expert][1].append(juror.pmi)
    scored = {
        name: auroc(labels, pmis)
        for name, (labels, pmis) in per_expert.items()
        if len(labels) >= min_rows and len(set(labels)) > 1
    }
    return max(scored, key=scored.get) if scored else None


def save_evidence(evidence: Sequence[RowEvidence], path: str | Path) -> None:
    """Write collected evidence as JSONL, to refit a calibrator later without scoring again."""
    Path(path).write_text("".join(e.model_dump_json() + "\n" for e in evidence), encoding="utf-8")


def saved_evidence(path: str | Path) -> list[tuple[int, RowEvidence]]:
    """(line number, evidence) of each line of a file written by :func:`save_evidence`; a line
    that is not saved evidence is a MoseError naming it."""
    out = []
    for number, line in _jsonl_lines(path):
        try:
            out.append((number, RowEvidence.model_validate_json(line)))
        except ValidationError:
            raise MoseError(f"{path}:{number}: not a line of saved jury evidence") from None
    return out


def load_evidence(
    paths: Sequence[str | Path], rows: Sequence[CheckRow], servable: set[str], adapters_read_question: bool = True
) -> list[RowEvidence]:
    """Evidence collected earlier (:func:`save_evidence`) for ``rows``, first file winning.

    Refused when a juror is not an expert this pool serves (the evidence came from other experts),
    when the jurors scored the other way (``adapters_read_question``) or when a row of ``rows``
    has no evidence (:func:`answer_states` refuses rows without the probe's state). Features are
    recomputed from the jurors' evidence, so files written before a feature change stay usable.
    """
    wanted = {row.digest(): row for row in rows}
    found: dict[str, RowEvidence] = {}
    for path in paths:
        for number, item in saved_evidence(path):
            unknown = {j.expert for j in item.jurors} - servable
            if unknown:
                raise MoseError(
                    f"{path}:{number}: evidence from experts this pool does not serve "
                    f"({', '.join(sorted(unknown))}): collect it again"
                )
            if item.adapters_read_question != adapters_read_question:
                raise MoseError(
                    f"{path}:{number}: evidence collected with adapters_read_question="
                    f"{item.adapters_read_question}, this jury scores with {adapters_read_question}"
                )
            digest = item.row.digest()
            if digest in wanted and digest not in found:
                item.refresh_values()
                found[digest] = item
    missing = len(wanted) - len(found)
    if missing:
        raise MoseError(f"{missing} of {len(wanted)} rows have no saved evidence: drop --evidence or collect them")
    return [found[digest] for digest in wanted]


def train(
    jury: Jury,
    rows: Sequence[CheckRow],
    config: CalibratorConfig | None = None,
    k: int | None = None,
    progress: bool = True,
    evidence: Sequence[RowEvidence] | None = None,
    probe_rows: Sequence[CheckRow] = (),
) -> Calibrator:
    """Fit a calibrator on the train-bucket rows given (test-bucket rows are dropped); ``evidence``:
    already collected for exactly those rows (:func:`load_evidence`), else it is collected here.
    With a probe (``config.probe_layer``), rows of ``evidence`` without the base model's answer
    state get it (:func:`fill_answer_states`), and the probe also learns from the labelled
    train-bucket rows of ``probe_rows`` that are not among ``rows`` (their answer states only:
    :func:`probe_states`) and, with :attr:`~jury.calibrator.CalibratorConfig.probe_negatives`,
    from the wrong answers constructed from those rows alone."""
    rows = [r for r in rows if not r.is_test()]
    seen = {r.digest() for r in rows}
    probe_rows = [r for r in probe_rows if not r.is_test() and not is_constructed(r.source) and r.digest() not in seen]
    if not rows:
        raise MoseError("no training rows left after holding out the test bucket")
    config = config or CalibratorConfig()
    if evidence is None:
        evidence = collect(jury, rows, k, progress=progress, state_layer=config.probe_layer)
    states, extra, negatives, negative_states, checks = None, None, [], None, None
    if config.probe_layer is not None:
        fill_answer_states(jury, evidence, config.probe_layer, progress)
        states = answer_states(evidence, config.probe_layer)
        if probe_rows:
            extra = (
                probe_states(jury, probe_rows, config.probe_layer, progress),
                np.array([r.label for r in probe_rows]),
            )
            checks = check_matrix(probe_rows)
            negatives = probe_negatives(probe_rows, config)
            if negatives:
                negative_states = probe_states(jury, negatives, config.probe_layer, progress, "probe negatives")
    constructed = np.array([e.row.origin() != e.row.digest() for e in evidence])
    calibrator = fit_calibrator(
        matrix(evidence),
        np.array([e.row.label for e in evidence]),
        config,
        states,
        constructed,
        perturbed_pairs(evidence),
        extra,
        negative_states,
        checks,
    )
    calibrator.trained_on = {
        **calibrator.trained_on,
        "rows": len(rows),
        "probe_rows": len(probe_rows) if extra is not None else 0,
        "probe_negatives": negatives_mix(negatives),
        "sources": sorted({r.source for r in rows}),
        "negatives": negatives_mix(rows),
        "row_digests": sorted(r.digest() for r in [*rows, *(probe_rows if extra is not None else ())]),
        "best_single_expert": best_single_expert(evidence),
        "k": jury.config.k if k is None else k,
        "adapters_read_question": jury.adapters_read_question,
        "pool_dtype": jury.pool.dtype,  # provenance: bf16 and float32 evidence differ by rounding
    }
    return calibrator


def probe_negatives(probe_rows: Sequence[CheckRow], config: CalibratorConfig) -> list[CheckRow]:
    """Wrong answers constructed from ``probe_rows`` alone (none without
    :attr:`~jury.calibrator.CalibratorConfig.probe_negatives`), for the truthfulness probe."""
    if not config.probe_negatives:
        return []
    return constructed_negatives(probe_rows, NegativesConfig(seed=config.seed))


def perturbed_pairs(evidence: Sequence[RowEvidence]) -> list[tuple[int, int]]:
    """(index of a correct row, index of the same answer with a fact changed) in ``evidence``."""
    index = {e.row.digest(): i for i, e in enumerate(evidence) if e.row.label == 1}
    return [
        (index[e.row.origin()], i)
        for i, e in enumerate(evidence)
        if e.row.source.startswith(PERTURBED) and e.row.origin() in index
    ]


def evaluation_evidence(
    jury: Jury, rows: Sequence[CheckRow], k: int | None = None, progress: bool = True
) -> list[RowEvidence]:
    """The jury's evidence on the rows of ``rows`` the calibrator never saw, with the calibrator's
    best single expert scoring beside the jury (a baseline of :func:`evaluate`)."""
    if jury.calibrator is None:
        raise MoseError("evaluation needs a trained calibrator: run `mose crosscheck train` first")
    seen = set(jury.calibrator.trained_on.get("row_digests", []))
    rows = [r for r in rows if r.digest() not in seen]
    if not rows:
        raise MoseError("every row given was used to train the calibrator: evaluate on other rows")
    best = jury.calibrator.trained_on.get("best_single_expert")
    return collect(jury, rows, k, extra=[best] if best else [], progress=progress)


def evaluate(
    jury: Jury,
    rows: Sequence[CheckRow],
    k: int | None = None,
    progress: bool = True,
    evidence: Sequence[RowEvidence] | None = None,
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """The contract JSON of ``mose crosscheck eval`` on rows the calibrator never saw.

    ``evidence``: :func:`evaluation_evidence` of ``rows``, collected earlier (saved and loaded
    again, to evaluate another calibrator on the same draw); else it is collected here.
    ``plots_dir``: also draw the reliability diagram of the labelled rows and each source's ROC
    curve there (PNG).
    """
    if evidence is None:
        evidence = evaluation_evidence(jury, rows, k, progress)
    elif jury.calibrator is None:
        raise MoseError("evaluation needs a trained calibrator: run `mose crosscheck train` first")
    seen = set(jury.calibrator.trained_on.get("row_digests", []))
    evidence = [e for e in evidence if e.row.digest() not in seen]
    if not evidence:
        raise MoseError("every row of the saved evidence was used to train the calibrator: evaluate on other rows")
    best = jury.calibrator.trained_on.get("best_single_expert")
    if best and any(all(j.expert != best for j in e.jurors) for e in evidence):
        raise MoseError(
            f"the saved evidence has no scores from {best}, this calibrator's best single expert "
            "(saved by `train`, or under another calibrator): evaluate without --evidence"
        )
    p_all = jury.calibrator.predict(calibrator_inputs(jury.calibrator, evidence))
    constructed = [(e, p) for e, p in zip(evidence, p_all) if is_constructed(e.row.source)]
    kept = [i for i, e in enumerate(evidence) if not is_constructed(e.row.source)]
    if not kept:
        raise MoseError("evaluation needs labelled rows besides the constructed ones")
    evidence, p = [evidence[i] for i in kept], p_all[kept]
    labels = np.array([e.row.label for e in evidence])
    x = matrix(evidence)
    flagged = p < jury.calibrator.threshold
    wrong = labels == 0
    per_source: dict[str, dict[str, Any]] = {}
    for source in sorted({e.row.source for e in evidence}):
        mask = np.array([e.row.source == source for e in evidence])
        per_source[source] = {
            "n": int(mask.sum()),
            "auroc": _round(auroc(labels[mask], p[mask])),
            "positive_rate": _round(float(labels[mask].mean())),
        }
    per_source.update(
        constructed_figures(constructed, dict(zip((e.row.digest() for e in evidence), p)), jury.calibrator.threshold)
    )
    from sklearn.metrics import average_precision_score

    base_pmi = [next(j.pmi for j in e.jurors if j.expert == BASE_EXPERT) for e in evidence]
    best_pmi = [next((j.pmi for j in e.jurors if j.expert == best), np.nan) for e in evidence] if best else []
    report = {
        "n": len(evidence),
        "auroc": _round(auroc(labels, p)),
        "auprc": _round(float(average_precision_score(labels, p))),
        "ece": _round(expected_calibration_error(p, labels)),
        "ece_if_calibrated": {key: _round(value) for key, value in ece_if_calibrated(p).items()},
        "flag_precision": _round(float(wrong[flagged].mean()) if flagged.any() else float("nan")),
        "flag_recall": _round(float(flagged[wrong].mean()) if wrong.any() else float("nan")),
        "flag_rate": _round(float(flagged.mean())),
        "threshold": _round(jury.calibrator.threshold),
        "per_source": per_source,
        "baselines": {
            "base_model_pmi": _round(auroc(labels, base_pmi)),
            "best_single_expert": _round(auroc(labels, best_pmi)) if best else None,
            "jury_uncalibrated": _round(auroc(labels, x[:, FEATURES.index("jury_pmi")])),
        },
        "best_single_expert_name": best,
        "calibrator": {"version": jury.calibrator.version, "method": jury.calibrator.method},
        "seconds_per_item": _round(float(np.mean([e.seconds for e in evidence]))),
        "items_per_second": _round(1.0 / max(float(np.mean([e.seconds for e in evidence])), 1e-9)),
    }
    if plots_dir is not None:
        report["plots"] = jury_plots(evidence, p, constructed, Path(plots_dir), report["ece"])
    return report


def jury_plots(
    evidence: Sequence[RowEvidence],
    p: np.ndarray,
    constructed: Sequence[tuple[RowEvidence, float]],
    plots_dir: Path,
    ece: float,
) -> list[str]:
    """reliability.png (labelled rows) and roc.png (each labelled source; each constructed source
    against the rows it was made from)."""
    from router_model.calibration import reliability_bins
    from router_model.plots import reliability_plot, roc_plot

    plots_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([e.row.label for e in evidence])
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for source in sorted({e.row.source for e in evidence}):
        mask = np.array([e.row.source == source for e in evidence])
        curves[source] = (labels[mask].tolist(), p[mask].tolist())
    p_of_row = dict(zip((e.row.digest() for e in evidence), p))
    for source in sorted({e.row.source for e, _ in constructed}):
        made = [q for e, q in constructed if e.row.source == source]
        origins = sorted({e.row.origin() for e, _ in constructed if e.row.source == source} & set(p_of_row))
        curves[source] = ([1] * len(origins) + [0] * len(made), [p_of_row[d] for d in origins] + made)
    return [
        str(
            reliability_plot(
                reliability_bins(p, labels), ece or 0.0, plots_dir / "reliability.png", title="jury reliability"
            )
        ),
        str(roc_plot(curves, plots_dir / "roc.png", "jury ROC per source (AUROC)")),
    ]


def constructed_figures(
    constructed: Sequence[tuple[RowEvidence, float]], p_of_row: dict[str, float], threshold: float
) -> dict[str, dict[str, Any]]:
    """Per constructed source: how many, their AUROC against the correct rows they were made from
    (all wrong, so 1.0 is every one below every origin), and the share flagged."""
    out: dict[str, dict[str, Any]] = {}
    for source in sorted({e.row.source for e, _ in constructed}):
        made = [(e, p) for e, p in constructed if e.row.source == source]
        origins = sorted({e.row.origin() for e, _ in made if e.row.origin() in p_of_row})
        scores = [p_of_row[d] for d in origins] + [p for _, p in made]
        out[source] = {
            "n": len(made),
            "constructed": True,
            "auroc": _round(auroc([1] * len(origins) + [0] * len(made), scores)),
            "flagged": _round(float(np.mean([p < threshold for _, p in made]))),
        }
    return out


def ece_if_calibrated(p: np.ndarray, draws: int = 200, seed: int = 0) -> dict[str, float]:
    """ECE that these probabilities would show on this many rows if they were exactly right:
    labels drawn from ``p`` itself (mean and 95th percentile over ``draws``). On a few hundred
    rows the binning alone gives several points of ECE; a measured ECE within this range cannot
    be told from perfect calibration."""
    rng = np.random.default_rng(seed)
    values = [expected_calibration_error(p, (rng.random(len(p)) < p).astype(int)) for _ in range(draws)]
    return {"mean": float(np.mean(values)), "p95": float(np.quantile(values, 0.95))}


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return round(float(value), digits)


def dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=False)


def open_jury(home: Any, config: Any = None, require_calibrator: bool = False, pool: Any = None) -> Jury:
    """A jury over the home's active experts, router and current calibrator (when there is one)."""
    from experts.pool import ExpertPool
    from jury.calibrator import load_calibrator
    from registry import Registry
    from router_model.runtime import load_router

    registry = Registry.open(home)
    pool = pool or ExpertPool.from_registry(registry, home=home)
    try:
        calibrator = load_calibrator(home.crosscheck_dir)
    except MoseError:
        if require_calibrator:
            raise
        calibrator = None
    from router_model.embedder import MiniLMEmbedder

    router = load_router(home, registry, strict=False)
    return Jury(pool, router, registry, calibrator, config, embedder=MiniLMEmbedder())
