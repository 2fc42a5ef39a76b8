"""The calibrator: method choice, calibration, flag threshold, versioned artifacts."""

from __future__ import annotations

import numpy as np
import pytest

from jury.calibrator import (
    CHECK_FEATURES,
    FEATURES,
    CalibratorConfig,
    fit_calibrator,
    load_calibrator,
    save_calibrator,
)
from registry.errors import MoseError
from router_model.calibration import expected_calibration_error

NO_CHECKS = {check: 0.0 for check in CHECK_FEATURES}
"""The outcome of :func:`jury.checks.text_checks` on an answer that fails none."""


def _features(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` rows of standard-normal evidence; the check columns (last) stay 0: no answer fails one."""
    x = np.zeros((n, len(FEATURES)))
    x[:, : len(FEATURES) - len(CHECK_FEATURES)] = rng.normal(size=(n, len(FEATURES) - len(CHECK_FEATURES)))
    return x


def _evidence(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features whose jury PMI carries a real but noisy signal about the label (like the jury's)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = _features(rng, n)
    x[:, FEATURES.index("jury_pmi")] = 3.0 * labels + rng.normal(0, 2.0, n) + 5.0  # badly scaled
    return x, labels


def test_calibrated_probabilities_beat_the_raw_squash_on_unseen_rows():
    x, labels = _evidence(1200, seed=1)
    calibrator = fit_calibrator(x, labels, CalibratorConfig(seed=0))
    test_x, test_labels = _evidence(600, seed=2)
    p = calibrator.predict(test_x)
    assert np.all((p >= 0) & (p <= 1))
    raw = 1 / (1 + np.exp(-test_x[:, 0]))  # the uncalibrated fallback
    assert expected_calibration_error(p, test_labels) < 0.06
    assert expected_calibration_error(p, test_labels) < expected_calibration_error(raw, test_labels) - 0.1
    assert calibrator.method in ("logistic", "boosted", "isotonic")
    assert calibrator.metrics["validation_log_loss"] <= calibrator.metrics["validation_log_loss_isotonic"]


def test_flag_threshold_reaches_target_precision_on_validation_like_rows():
    x, labels = _evidence(1500, seed=3)
    calibrator = fit_calibrator(x, labels, CalibratorConfig(target_flag_precision=0.85))
    test_x, test_labels = _evidence(1500, seed=4)
    flagged = calibrator.predict(test_x) < calibrator.threshold
    assert flagged.any()
    # Chosen on ~375 validation rows, the cut carries sampling noise; the base rate of wrong is 0.5.
    assert (test_labels[flagged] == 0).mean() > 0.75
    assert calibrator.threshold <= 0.5  # never flags what it thinks is more likely right


def test_too_few_or_one_class_rows_are_refused():
    x, labels = _evidence(10, seed=5)
    with pytest.raises(MoseError, match="at least 20 labelled rows with both correct and wrong"):
        fit_calibrator(x, labels)
    x, _ = _evidence(100, seed=6)
    with pytest.raises(MoseError, match="both correct and wrong"):
        fit_calibrator(x, np.ones(100, dtype=int))


def test_versions_round_trip_and_damage_is_reported(tmp_path):
    x, labels = _evidence(300, seed=7)
    first = fit_calibrator(x, labels)
    save_calibrator(first, tmp_path)
    second = fit_calibrator(x, labels, CalibratorConfig(seed=1))
    save_calibrator(second, tmp_path)
    loaded = load_calibrator(tmp_path)
    assert (first.version, loaded.version) == ("v0001", "v0002")
    assert np.allclose(loaded.predict(x[:5]), second.predict(x[:5]))
    (tmp_path / "v0002.json").write_text("{ not json")
    with pytest.raises(MoseError, match="v0002.json is missing or damaged .* retrain with `mose crosscheck train`"):
        load_calibrator(tmp_path)
    with pytest.raises(MoseError, match="no cross-check calibrator in .* train one with `mose crosscheck train"):
        load_calibrator(tmp_path / "empty")
    (tmp_path / "v0002.json").write_text(second.model_copy(update={"features": ["jury_pmi"]}).model_dump_json())
    with pytest.raises(MoseError, match="v0002.json was trained on other features .* `mose crosscheck train`"):
        load_calibrator(tmp_path)


def test_isotonic_candidate_increases_with_the_jury_pmi():
    """Support from the jurors must not lower P(correct): the isotonic candidate follows an
    increasing relation and stays flat on a decreasing one (it never turns it around)."""
    from sklearn.metrics import roc_auc_score

    from jury.calibrator import fit_isotonic

    x, labels = _evidence(1200, seed=8)
    test_x, test_labels = _evidence(600, seed=9)
    calibrator = fit_isotonic(x[:, 0], labels)
    p = calibrator.predict(test_x)
    assert p.std() > 0.1 and roc_auc_score(test_labels, p) > 0.75
    assert np.all(np.diff(calibrator.predict(_sorted_by_pmi(test_x))) >= 0)
    against = fit_isotonic(-x[:, 0], labels)
    assert np.all(np.diff(against.predict(_sorted_by_pmi(-test_x))) >= 0)


def _sorted_by_pmi(x: np.ndarray) -> np.ndarray:
    return x[np.argsort(x[:, FEATURES.index("jury_pmi")])]


def test_boosted_trees_find_a_sign_flip_the_logistic_model_cannot_and_survive_json():
    """The same evidence pointing opposite ways for short and long answers (as the base model's
    PMI did on HaluEval QA and GSM8K): one linear weight cannot express that; two-level trees can.
    The JSON artifact predicts exactly what scikit-learn's model does."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from jury.calibrator import MONOTONE_FEATURES, TREE_FEATURES, Calibrator, fit_boosted, fit_logistic

    def sign_flip(n, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, n)
        x = _features(rng, n)
        long = (rng.random(n) < 0.3).astype(float)  # a minority of long responses
        x[:, FEATURES.index("long_answer")] = long
        x[:, FEATURES.index("base_pmi")] = np.where(long == 1, -1.0, 1.0) * (2 * labels - 1) + rng.normal(0, 1, n)
        return x, labels

    x, labels = sign_flip(1000, seed=10)
    test_x, test_labels = sign_flip(1000, seed=11)
    config = CalibratorConfig()
    boosted = roc_auc_score(test_labels, fit_boosted(x, labels, config).predict(test_x))
    linear = roc_auc_score(test_labels, fit_logistic(x, labels, 1.0).predict(test_x))
    assert boosted > 0.8 and linear < 0.7, (boosted, linear)  # linear: the majority's direction only

    columns = [FEATURES.index(name) for name in TREE_FEATURES]
    reference = HistGradientBoostingClassifier(
        max_iter=config.boosted_trees,
        max_depth=config.boosted_depth,
        learning_rate=config.boosted_learning_rate,
        min_samples_leaf=config.boosted_min_leaf,
        early_stopping=False,
        random_state=config.seed,
        monotonic_cst=[int(name in MONOTONE_FEATURES) for name in TREE_FEATURES],
    )
    expected = reference.fit(x[:, columns], labels).predict_proba(test_x[:, columns])[:, 1]
    reloaded = Calibrator.model_validate_json(fit_boosted(x, labels, config).model_dump_json())
    assert np.allclose(reloaded.predict(test_x), expected, atol=1e-9)
    assert fit_calibrator(x, labels).method == "boosted"  # chosen by cross-validated log loss


def test_more_support_from_the_jurors_never_lowers_p_correct():
    """On rows where the jurors' PMI runs against correctness (fluent misconceptions in the labelled
    sets), the calibrator still may not turn more support into a lower P(correct): raising any of
    MONOTONE_FEATURES, its interactions moved with it, lowers P(correct) on no row."""
    from jury.calibrator import MONOTONE_FEATURES, fit_boosted, is_monotone, raise_support

    x, labels = _evidence(1200, seed=12)
    x[:, FEATURES.index("jury_pmi")] = -x[:, FEATURES.index("jury_pmi")]  # support runs against correctness
    x[:, FEATURES.index("contrast_pmi")] = 2.0 * labels + np.random.default_rng(3).normal(0, 1, len(labels))
    calibrator = fit_calibrator(x, labels, CalibratorConfig(seed=0))
    test_x, _ = _evidence(400, seed=13)
    assert is_monotone(calibrator, test_x)
    p = calibrator.predict(test_x)
    for feature in MONOTONE_FEATURES:
        for delta in (0.1, 1.0, 5.0):
            assert np.all(calibrator.predict(raise_support(test_x, FEATURES, feature, delta)) >= p - 1e-9), feature
    boosted = fit_boosted(x, labels, CalibratorConfig(seed=0))
    assert is_monotone(boosted, test_x)
    # an unconstrained logistic fit on the same rows would use the PMI against correctness
    from jury.calibrator import fit_logistic

    assert not is_monotone(fit_logistic(x, labels, 1.0), test_x)


def _saved_evidence(tmp_path, experts=("demo-law", "base")):
    """Two rows of jury evidence written with save_evidence (values deliberately stale)."""
    from jury.crosscheck import CheckRow, RowEvidence, save_evidence
    from jury.jury import JurorEvidence

    rows = [
        CheckRow(question=f"Question {i}?", answer=f"Answer {i}.", label=i % 2, source="s", id=f"r{i}")
        for i in range(2)
    ]
    evidence = [
        RowEvidence(
            row=row,
            seconds=0.1,
            values={"stale": 1.0},
            jury_size=len(experts),
            jurors=[
                JurorEvidence(
                    expert=name, logp_given_question=-1.0 - i, logp_without_question=-2.0, pmi=1.0 - i, answer_tokens=4
                )
                for name in experts
            ],
        )
        for i, row in enumerate(rows)
    ]
    path = tmp_path / "evidence.jsonl"
    save_evidence(evidence, path)
    return rows, path


def test_saved_evidence_reloads_with_fresh_features_and_refuses_what_does_not_fit(tmp_path):
    from jury.crosscheck import CheckRow, load_evidence

    rows, path = _saved_evidence(tmp_path)
    loaded = load_evidence([path], rows, {"demo-law", "base"})
    assert [e.row.id for e in loaded] == ["r0", "r1"]
    assert list(loaded[0].values) == list(FEATURES)  # recomputed, not the stale values on file
    assert loaded[1].values["contrast_pmi"] == 0.0 and loaded[1].values["jury_pmi"] == 0.0
    with pytest.raises(MoseError, match="evidence from experts this pool does not serve \\(demo-law\\)"):
        load_evidence([path], rows, {"base"})
    other = CheckRow(question="Unscored?", answer="Yes.", label=1, id="r9")
    with pytest.raises(MoseError, match="1 of 3 rows have no saved evidence"):
        load_evidence([path], rows + [other], {"demo-law", "base"})
    with pytest.raises(
        MoseError,
        match="evidence.jsonl:1: evidence collected with adapters_read_question=True, this jury scores with False",
    ):
        load_evidence([path], rows, {"demo-law", "base"}, adapters_read_question=False)
    path.write_text(path.read_text() + "{ not evidence\n")
    with pytest.raises(MoseError, match="evidence.jsonl:3: not a line of saved jury evidence"):
        load_evidence([path], rows, {"demo-law", "base"})


def test_a_calibrator_scores_with_the_jurors_reading_its_evidence_was_collected_with():
    """Answer-only adapters give other evidence: a jury follows its calibrator, and refuses a
    calibrator fitted the other way when the setting is forced."""
    from jury.jury import Jury, JuryConfig

    x, labels = _evidence(400, seed=5)
    answer_only = fit_calibrator(x, labels, CalibratorConfig(seed=0))
    answer_only.trained_on["adapters_read_question"] = False
    older = fit_calibrator(x, labels, CalibratorConfig(seed=0))  # fitted before the setting existed
    values = dict(zip(FEATURES, x[0]))
    assert Jury(None, None, None, answer_only).adapters_read_question is False
    assert Jury(None, None, None, older).adapters_read_question is True
    assert Jury(None, None, None).adapters_read_question is False  # no calibrator: the faster default
    assert 0.0 <= Jury(None, None, None, answer_only).probability(values) <= 1.0
    forced = Jury(None, None, None, answer_only, JuryConfig(adapters_read_question=True))
    with pytest.raises(
        MoseError, match="fitted on evidence with adapters_read_question=False, but this jury scores with True"
    ):
        forced.probability(values)


def test_stratified_sample_keeps_each_sources_share_of_correct_answers():
    from jury.crosscheck import CheckRow, stratified_sample

    rows = [
        CheckRow(question=f"q{i}", answer="a", label=int(i % 3 != 0), source="two_thirds", id=f"t{i}")
        for i in range(300)
    ]
    rows += [CheckRow(question=f"p{i}", answer="a", label=i % 2, source="half", id=f"h{i}") for i in range(40)]
    sample = stratified_sample(rows, 60, seed=3)
    by_source = {s: [r.label for r in sample if r.source == s] for s in ("two_thirds", "half")}
    assert (len(by_source["two_thirds"]), sum(by_source["two_thirds"])) == (60, 40)
    assert (len(by_source["half"]), sum(by_source["half"])) == (40, 20)  # fewer rows than asked: all
    assert len({r.id for r in sample}) == len(sample)
    assert [r.id for r in stratified_sample(rows, 60, seed=3)] == [r.id for r in sample]
    assert [r.id for r in stratified_sample(rows, 60, seed=4)] != [r.id for r in sample]
    assert stratified_sample(rows, None, seed=0) == rows


def test_ece_if_calibrated_separates_sampling_noise_from_miscalibration():
    from jury.crosscheck import ece_if_calibrated

    rng = np.random.default_rng(12)
    p = rng.uniform(0.3, 0.8, 300)
    floor = ece_if_calibrated(p)
    honest = expected_calibration_error(p, (rng.random(300) < p).astype(int))
    shifted = expected_calibration_error(p, (rng.random(300) < p - 0.15).astype(int))
    assert 0.02 < floor["mean"] < floor["p95"] < 0.12  # 300 rows: several points from binning alone
    assert honest < floor["p95"] < shifted


def test_an_experts_vote_is_its_own_contribution_beside_the_base_model():
    """A vote says whether the juror's evidence raises P(correct) above the base model's alone,
    so what every juror shares (here: the answer's length) cancels."""
    from jury.calibrator import Calibrator
    from jury.jury import JurorEvidence, Jury

    def calibrator(weights: dict[str, float], intercept: float) -> Calibrator:
        return Calibrator(
            method="logistic",
            mean=[0.0] * len(FEATURES),
            scale=[1.0] * len(FEATURES),
            coef=[weights.get(name, 0.0) for name in FEATURES],
            intercept=intercept,
        )

    def juror(name: str, pmi: float) -> JurorEvidence:
        return JurorEvidence(
            expert=name, logp_given_question=-1.0, logp_without_question=-1.0 - pmi, pmi=pmi, answer_tokens=12
        )

    jurors = [juror("sharp", 1.5), juror("muddled", -0.5), juror("base", 0.5)]
    Jury(None, None, None, calibrator({"contrast_pmi": 1.0}, intercept=0.2)).cast_votes("Q?", jurors, NO_CHECKS, None)
    assert [j.vote for j in jurors] == [True, False, True]  # base: sigmoid(0.2) > 0.5

    jurors = [juror("sharp", 1.5), juror("muddled", -0.5), juror("base", 0.5)]
    Jury(None, None, None, calibrator({"log_answer_tokens": -1.0}, intercept=0.0)).cast_votes(
        "Q?", jurors, NO_CHECKS, None
    )
    assert [j.vote for j in jurors] == [False, False, False]  # length alone: all side with the base


def _states(labels: np.ndarray, seed: int, width: int = 64) -> np.ndarray:
    """Hidden states with a weak 'truth direction': a real but noisy signal among noisy dimensions."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=width)
    return rng.normal(size=(len(labels), width)) * 3.0 + np.outer(2 * labels - 1, direction) * 0.5


def test_a_truthfulness_probe_adds_what_the_jurors_miss_and_survives_json(tmp_path):
    """Jury features that carry nothing, states that carry the label: the probe's out-of-fold
    logit becomes the calibrator's last column and separates unseen rows; the saved calibrator
    predicts the same after reloading."""
    from sklearn.metrics import roc_auc_score

    from jury.calibrator import PROBE_FEATURE

    rng = np.random.default_rng(0)
    labels, test_labels = rng.integers(0, 2, 800), rng.integers(0, 2, 400)
    x, test_x = _features(rng, 800), _features(rng, 400)
    states, test_states = _states(labels, 1), _states(test_labels, 2)
    without = fit_calibrator(x, labels)
    with_probe = fit_calibrator(x, labels, CalibratorConfig(probe_layer=7), states)
    assert without.probe is None and without.features == list(FEATURES)
    assert with_probe.features == [*FEATURES, PROBE_FEATURE] and with_probe.probe.layer == 7
    assert with_probe.probe.strength in CalibratorConfig().probe_strengths
    inputs = np.column_stack([test_x, with_probe.probe.logits(test_states)])
    p = with_probe.predict(inputs)
    assert roc_auc_score(test_labels, p) > 0.8
    assert roc_auc_score(test_labels, without.predict(test_x)) < 0.6
    assert with_probe.metrics["probe_validation_auroc"] > 0.8

    save_calibrator(with_probe, tmp_path)
    assert np.allclose(load_calibrator(tmp_path).predict(inputs), p)
    with pytest.raises(MoseError, match="the truthfulness probe reads 64-wide states, got 32"):
        with_probe.probe.logits(test_states[:, :32])


def test_evidence_without_answer_states_cannot_train_a_probe(tmp_path):
    from jury.crosscheck import answer_states, load_evidence

    rows, path = _saved_evidence(tmp_path)
    evidence = load_evidence([path], rows, {"demo-law", "base"})
    with pytest.raises(
        MoseError,
        match="2 of 2 rows of evidence have no base-model answer state at layer 20 "
        ".* collect them again, or train without the probe \\(--no-probe\\)",
    ):
        answer_states(evidence, 20)
    for item in evidence:
        item.answer_state, item.state_layer = [0.0, 1.0], 18
    with pytest.raises(MoseError, match="2 of 2 rows .* at layer 20"):
        answer_states(evidence, 20)
    assert answer_states(evidence, 18).shape == (2, 2)


def test_a_jury_with_a_probe_reads_the_base_models_state_and_asks_the_pool_for_it():
    from jury.calibrator import PROBE_FEATURE, Calibrator
    from jury.jury import JurorEvidence, Jury

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    calibrator = fit_calibrator(_features(rng, 200), labels, CalibratorConfig(probe_layer=20), _states(labels, 4))
    jury = Jury(None, None, None, calibrator)
    assert jury.state_layer == 20 and Jury(None, None, None).state_layer is None
    state = _states(np.array([1]), 5)[0].tolist()
    jurors = [
        JurorEvidence(
            expert=name,
            logp_given_question=-1.0,
            logp_without_question=-2.0,
            pmi=1.0,
            answer_tokens=3,
            answer_state=state if name == "base" else None,
        )
        for name in ("demo-law", "base")
    ]
    values = jury.evidence_values(jurors, "Question?", NO_CHECKS, None)
    assert values[PROBE_FEATURE] == pytest.approx(float(calibrator.probe.logits(np.array(state))[0]))
    assert 0.0 <= jury.probability(values) <= 1.0
    assert "answer_state" not in jurors[1].model_dump()  # verdicts do not carry the 576 numbers
    # votes: the experts' by the probe-less voter fitted on the same rows, the base model's with its probe
    assert calibrator.voter.probe is None and calibrator.voter.features == list(FEATURES)
    assert Calibrator.model_validate_json(calibrator.model_dump_json()).voter == calibrator.voter
    jury.cast_votes("Question?", jurors, NO_CHECKS, None)
    alone = jury.probability(
        jury.evidence_values([jurors[0].model_copy(update={"weight": 1.0}), jurors[1]], "Question?", NO_CHECKS, None),
        calibrator.voter,
    )
    reference = jury.probability(jury.evidence_values([jurors[1]], "Question?", NO_CHECKS, None), calibrator.voter)
    assert jurors[0].vote == (alone > reference if alone != reference else reference > 0.5)
    assert jurors[1].vote == (jury.probability(jury.evidence_values([jurors[1]], "Question?", NO_CHECKS, None)) > 0.5)
    jurors[1].answer_state = None
    with pytest.raises(MoseError, match="reads the base model's answer state at layer 20, and the evidence has none"):
        jury.evidence_values(jurors, "Question?", NO_CHECKS, None)


def test_platt_recalibration_tames_an_overconfident_fit_and_survives_json(tmp_path):
    """21 noise features, one informative, a weakly regularised logistic fit on 220 rows: its
    probabilities on unseen rows are too sure. Platt scaling on its out-of-fold log-odds shrinks
    them (slope < 1) and lowers the unseen rows' log loss; the scaling is saved with the calibrator."""
    from sklearn.metrics import log_loss

    from jury.calibrator import MONOTONE_FEATURES

    rng = np.random.default_rng(0)
    x = _features(rng, 2400)
    signal = x[:, FEATURES.index("jury_logp_given")].copy()
    labels = (signal + rng.normal(size=2400) > 0).astype(int)
    # the jurors' support columns (whose direction the calibrator keeps) carry the signal or nothing
    for name in MONOTONE_FEATURES:
        for column in (name, f"{name}_x_long", f"{name}_x_log_answer_tokens"):
            x[:, FEATURES.index(column)] = 0.0
    x[:, FEATURES.index("jury_logp_given")] = signal
    config = {"regularisation": (100.0,), "candidates": ("logistic", "isotonic")}
    raw = fit_calibrator(x[:220], labels[:220], CalibratorConfig(**config))
    scaled = fit_calibrator(x[:220], labels[:220], CalibratorConfig(recalibrate=True, **config))
    assert raw.recalibration is None and scaled.trained_on["candidate"] == raw.trained_on["candidate"]
    slope, _ = scaled.recalibration
    assert 0.0 < slope < 0.8
    assert log_loss(labels[220:], scaled.predict(x[220:])) < log_loss(labels[220:], raw.predict(x[220:])) - 0.01
    assert scaled.metrics["validation_ece"] < raw.metrics["validation_ece"]  # out-of-fold, both
    assert "validation_log_loss_recalibrated" in scaled.metrics
    save_calibrator(scaled, tmp_path)
    assert np.allclose(load_calibrator(tmp_path).predict(x[220:]), scaled.predict(x[220:]))


def test_an_averaged_probe_reads_as_the_mean_of_its_fold_probes():
    """average_probes folds each probe's standardisation into raw-state weights: its logit is
    exactly the mean of theirs; fit_probe(average_folds=True) keeps the same out-of-fold logits."""
    from jury.probe import _fit, average_probes, fit_probe

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    states, test_states = _states(labels, 1), _states(rng.integers(0, 2, 50), 2)
    probes = [_fit(states[part], labels[part], 0.01, 7) for part in (slice(0, 200), slice(100, 300))]
    averaged = average_probes(probes)
    expected = np.mean([probe.logits(test_states) for probe in probes], axis=0)
    assert averaged.layer == 7 and np.allclose(averaged.logits(test_states), expected)
    refit, refit_logits = fit_probe(states, labels, 7, (0.01, 0.1))
    mean, mean_logits = fit_probe(states, labels, 7, (0.01, 0.1), average_folds=True)
    assert np.allclose(refit_logits, mean_logits) and mean.strength == refit.strength
    assert not np.allclose(refit.logits(test_states), mean.logits(test_states))


def _with_constructed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled rows whose support carries no signal about correctness (the jurors cannot tell a
    fluent misconception from the truth), plus constructed wrong answers (moved from another
    question) whose support is far lower."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = _features(rng, n)
    for feature in ("jury_pmi", "jury_logp_given"):
        x[:, FEATURES.index(feature)] = rng.normal(0.5, 1.0, n)
    moved = _features(rng, n // 3)
    for feature in ("jury_pmi", "jury_logp_given"):
        moved[:, FEATURES.index(feature)] = rng.normal(-3.0, 1.0, n // 3)
    constructed = np.r_[np.zeros(n, bool), np.ones(n // 3, bool)]
    return np.vstack([x, moved]), np.r_[labels, np.zeros(n // 3, dtype=int)], constructed


def test_the_gate_flags_answers_moved_from_another_question_and_leaves_labelled_rows_at_their_rate():
    x, labels, constructed = _with_constructed(600, seed=21)
    calibrator = fit_calibrator(x, labels, CalibratorConfig(seed=0), constructed=constructed)
    assert calibrator.gate is not None and all(c >= 0 for c in calibrator.gate.coef)
    test_x, test_labels, test_constructed = _with_constructed(300, seed=22)
    p = calibrator.predict(test_x)
    assert np.mean(p[test_constructed] < calibrator.threshold) >= 0.9
    assert np.mean(p[~test_constructed] < calibrator.threshold) <= 0.2
    # the labelled rows carry no signal: their P(correct) stays near their rate, not dragged down
    # by the constructed rows (which the candidate never learns from)
    assert abs(p[~test_constructed].mean() - test_labels[~test_constructed].mean()) < 0.1
    assert calibrator.metrics["constructed_rows"] == 200 and calibrator.metrics["gate_validation_auroc"] > 0.9
    from jury.calibrator import MONOTONE_FEATURES, raise_support

    for feature in MONOTONE_FEATURES:
        assert np.all(calibrator.predict(raise_support(test_x, FEATURES, feature, 1.0)) >= p - 1e-9), feature


def test_constructed_rows_must_be_wrong_answers_and_the_gate_reads_support_only():
    x, labels, constructed = _with_constructed(200, seed=23)
    labels[-1] = 1
    with pytest.raises(MoseError, match="constructed rows are wrong answers"):
        fit_calibrator(x, labels, constructed=constructed)
    labels[-1] = 0
    with pytest.raises(MoseError, match="log_answer_tokens is not"):
        fit_calibrator(
            x, labels, CalibratorConfig(gate_features=("jury_pmi", "log_answer_tokens")), constructed=constructed
        )


def test_a_gated_calibrator_survives_saving_and_loading(tmp_path):
    x, labels, constructed = _with_constructed(300, seed=24)
    calibrator = fit_calibrator(x, labels, CalibratorConfig(seed=0), constructed=constructed)
    save_calibrator(calibrator, tmp_path)
    loaded = load_calibrator(tmp_path)
    assert loaded.gate == calibrator.gate
    assert np.allclose(loaded.predict(x[:20]), calibrator.predict(x[:20]))


def _with_changed_facts(n: int, seed: int, drop: float = 1.0):
    """Labelled rows whose support says nothing about correctness, plus, for each correct row, the
    same answer with a fact changed: everything alike but the jurors' log-prob given the question,
    lower by ``drop`` (noisy). Returns x, labels, constructed and the (correct, changed) pairs."""
    rng = np.random.default_rng(seed)
    x, labels = _features(rng, n), rng.integers(0, 2, n)
    right = np.flatnonzero(labels == 1)
    changed = x[right].copy()
    given = FEATURES.index("jury_logp_given")
    changed[:, given] -= drop + rng.normal(0, 0.3, len(right))
    pairs = [(int(i), n + k) for k, i in enumerate(right)]
    constructed = np.r_[np.zeros(n, bool), np.ones(len(right), bool)]
    return np.vstack([x, changed]), np.r_[labels, np.zeros(len(right), int)], constructed, pairs


def test_the_plausibility_term_ranks_a_correct_answer_above_its_changed_copy():
    x, labels, constructed, pairs = _with_changed_facts(400, seed=31)
    config = CalibratorConfig(
        seed=0, probe_layer=None, gate_features=("jury_pmi",), plausibility_features=("jury_logp_given",)
    )
    plain = fit_calibrator(x, labels, config.model_copy(update={"plausibility_features": ()}), None, constructed, pairs)
    termed = fit_calibrator(x, labels, config, None, constructed, pairs)
    assert plain.plausibility is None and termed.plausibility is not None
    assert termed.plausibility.pairs == len(pairs) and termed.plausibility.coef[0] > 0.3
    test_x, _, _, test_pairs = _with_changed_facts(200, seed=32)
    for calibrator, least in ((plain, 0.0), (termed, 0.9)):
        p = calibrator.predict(test_x)
        assert np.mean([p[a] > p[b] for a, b in test_pairs]) >= least
    p_plain = plain.predict(test_x)
    assert np.mean([p_plain[a] > p_plain[b] for a, b in test_pairs]) < 0.8  # what the term adds
    from jury.calibrator import MONOTONE_FEATURES, raise_support

    p = termed.predict(test_x)
    for feature in MONOTONE_FEATURES:
        assert np.all(termed.predict(raise_support(test_x, FEATURES, feature, 1.0)) >= p - 1e-9), feature


def test_the_plausibility_term_never_rewards_lower_support_and_survives_json(tmp_path):
    # changed copies the jurors find *more* likely: the term's weight stays at zero, not negative
    x, labels, constructed, pairs = _with_changed_facts(300, seed=33, drop=-1.0)
    term = CalibratorConfig(seed=0, probe_layer=None, plausibility_features=("jury_logp_given",))
    calibrator = fit_calibrator(x, labels, term, None, constructed, pairs)
    assert calibrator.plausibility is not None and calibrator.plausibility.coef == [0.0]
    with pytest.raises(MoseError, match="log_answer_tokens is not"):
        fit_calibrator(
            x, labels, CalibratorConfig(plausibility_features=("log_answer_tokens",)), None, constructed, pairs
        )
    x, labels, constructed, pairs = _with_changed_facts(300, seed=34)
    term = CalibratorConfig(seed=0, probe_layer=None, plausibility_features=("jury_logp_given",))
    calibrator = fit_calibrator(x, labels, term, None, constructed, pairs)
    save_calibrator(calibrator, tmp_path)
    loaded = load_calibrator(tmp_path)
    assert loaded.plausibility == calibrator.plausibility
    assert np.allclose(loaded.predict(x[:20]), calibrator.predict(x[:20]))


def test_more_rows_for_the_probe_alone_sharpen_it_and_the_candidate_learns_from_its_unseen_logits():
    """100 scored rows and 1,000 rows with answer states only: the probe fitted on all of them
    ranks unseen rows better than one fitted on the 100, and the candidate still learns only from
    the scored rows' out-of-fold probe logits (its probe column has one value per scored row)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels, extra_labels, test_labels = rng.integers(0, 2, 100), rng.integers(0, 2, 1000), rng.integers(0, 2, 400)
    x = _features(rng, 100)
    direction = np.random.default_rng(99).normal(size=400)
    direction *= 2.0 / np.linalg.norm(direction)  # a weak direction among 400 noisy dimensions, as a model's

    def wide_states(y: np.ndarray, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=(len(y), 400)) * 3.0 + np.outer(2 * y - 1, direction)

    states, extra_states, test_states = (
        wide_states(labels, 1),
        wide_states(extra_labels, 2),
        wide_states(test_labels, 3),
    )
    config = CalibratorConfig(probe_layer=20)
    alone = fit_calibrator(x, labels, config, states)
    more = fit_calibrator(x, labels, config, states, probe_rows=(extra_states, extra_labels))
    auroc_alone = roc_auc_score(test_labels, alone.probe.logits(test_states))
    auroc_more = roc_auc_score(test_labels, more.probe.logits(test_states))
    assert auroc_more > auroc_alone + 0.1 and auroc_more > 0.7
    assert more.metrics["train_rows"] == 100  # the candidate's rows; the probe's are not among them
    test_x = _features(rng, 400)
    p = more.predict(np.column_stack([test_x, more.probe.logits(test_states)]))
    assert roc_auc_score(test_labels, p) > 0.7
    with pytest.raises(
        MoseError, match="the probe's extra rows have \\(32,\\)-wide states, the scored rows \\(400,\\)"
    ):
        fit_calibrator(x, labels, config, states, probe_rows=(extra_states[:, :32], extra_labels))


def _probe_world(n: int, seed: int, wrong_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and 64-wide answer states: correctness along one direction, and (``wrong_shift``) a
    second direction where constructed wrong answers sit and labelled answers do not."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    states = rng.normal(size=(n, 64))
    states[:, 0] += 1.5 * (2 * labels - 1)
    states[:, 1] += wrong_shift
    return labels, states


def test_the_probe_candidate_is_the_probe_platt_scaled_on_every_labelled_row():
    """30 scored rows and 600 probe rows: the candidate reads the probe's logit alone, scaled by a
    fit on all 630 labelled rows' out-of-fold logits, so its probabilities on unseen rows are
    calibrated although 30 rows could not have chosen or fitted a model."""
    from sklearn.metrics import roc_auc_score

    labels, states = _probe_world(30, 1)
    extra_labels, extra_states = _probe_world(600, 2)
    test_labels, test_states = _probe_world(2000, 3)
    x = _features(np.random.default_rng(4), 30)
    config = CalibratorConfig(probe_layer=20, seed=0)
    fitted = fit_calibrator(x, labels, config, states, probe_rows=(extra_states, extra_labels))
    assert fitted.method == "logistic" and fitted.trained_on["candidate"].startswith("probe, Platt-scaled on 630")
    assert np.count_nonzero(fitted.coef) == 1 and fitted.coef[-1] > 0 and fitted.features[-1] == "base_probe"
    assert fitted.metrics["probe_labelled_rows"] == 630 and fitted.metrics["train_rows"] == 30
    logits = fitted.probe.logits(test_states)
    p = fitted.predict(np.column_stack([np.zeros((2000, len(FEATURES))), logits]))
    assert np.all(np.diff(p[np.argsort(logits)]) >= -1e-12)  # monotone in the probe's logit
    assert roc_auc_score(test_labels, p) > 0.8
    assert expected_calibration_error(p, test_labels) < 0.05
    chosen = fit_calibrator(x, labels, config.model_copy(update={"probe_candidate": False}), states,
                            probe_rows=(extra_states, extra_labels))  # fmt: skip
    assert not chosen.trained_on["candidate"].startswith("probe")


def test_the_probe_learns_constructed_wrong_answers_as_wrong():
    """Constructed wrong answers sit where no labelled answer does: a probe given their states as
    wrong reads such answers lower than one fitted on the labelled rows alone, and keeps ranking
    the labelled rows."""
    from sklearn.metrics import roc_auc_score

    labels, states = _probe_world(40, 1)
    extra_labels, extra_states = _probe_world(600, 2)
    _, negatives = _probe_world(300, 5, wrong_shift=3.0)
    test_labels, test_states = _probe_world(1000, 3)
    _, test_negatives = _probe_world(500, 6, wrong_shift=3.0)
    x = _features(np.random.default_rng(4), 40)
    config = CalibratorConfig(probe_layer=20, seed=0)
    plain = fit_calibrator(x, labels, config, states, probe_rows=(extra_states, extra_labels))
    taught = fit_calibrator(
        x, labels, config, states, probe_rows=(extra_states, extra_labels), probe_negative_states=negatives
    )
    for probe in (plain.probe, taught.probe):
        assert roc_auc_score(test_labels, probe.logits(test_states)) > 0.8

    def moved_auroc(probe) -> float:  # correct test answers against the constructed ones
        correct = probe.logits(test_states[test_labels == 1])
        return roc_auc_score(np.r_[np.ones(len(correct)), np.zeros(500)], np.r_[correct, probe.logits(test_negatives)])

    assert moved_auroc(taught.probe) > moved_auroc(plain.probe) + 0.1


def test_probe_negatives_are_made_from_the_probe_rows_alone():
    from jury.crosscheck import CheckRow, probe_negatives

    rows = [
        CheckRow(question=f"In which year did event {i} happen?", answer=f"It happened in {1900 + i}.", label=1,
                 source="s", domain=f"d{i % 3}", id=f"s/{i}")
        for i in range(40)
    ]  # fmt: skip
    made = probe_negatives(rows, CalibratorConfig())
    assert made and all(r.label == 0 for r in made)
    assert {r.origin() for r in made} <= {r.digest() for r in rows}
    assert {r.source.split("_")[0] for r in made} == {"swapped", "perturbed"}
    assert probe_negatives(rows, CalibratorConfig(probe_negatives=False)) == []


def test_the_probe_column_is_not_shrunk_with_the_jurors_columns():
    """bounded_logistic leaves unpenalised columns out of the L2 penalty: under a strong penalty
    the probe's weight stays near its unregularised value while a penalised copy shrinks."""
    from jury.calibrator import bounded_logistic

    rng = np.random.default_rng(0)
    score = rng.normal(size=2000)
    labels = (rng.random(2000) < 1 / (1 + np.exp(-2.0 * score))).astype(int)
    x = np.column_stack([score, rng.normal(size=2000)])
    strong = bounded_logistic(x, labels, None, [False, False], 0.001)
    free = bounded_logistic(x, labels, None, [False, False], 0.001, [True, False])
    reference = bounded_logistic(x, labels, None, [False, False], 1e6)
    assert strong["coef"][0] < 0.5 * reference["coef"][0]
    assert free["coef"][0] == pytest.approx(reference["coef"][0], rel=0.05)


def test_a_training_sample_keeps_the_probes_rows_apart_from_the_scored_ones_and_the_test_bucket():
    from jury.crosscheck import CheckRow, training_sample
    from jury.negatives import is_constructed

    rows = [
        CheckRow(
            question=f"Question {i} of {source}?", answer=f"Answer {i}.", label=i % 2, source=source, id=f"{source}/{i}"
        )
        for source in ("a", "b")
        for i in range(60)
    ]
    scored, probe = training_sample(rows, 5, 8, seed=0)
    labelled = [r for r in scored if not is_constructed(r.source)]
    assert len(labelled) == 10 and len(probe) == 16 and len(scored) > len(labelled)
    assert not {r.digest() for r in labelled} & {r.digest() for r in probe}
    assert not any(r.is_test() for r in [*scored, *probe])
    assert {r.origin() for r in scored} <= {r.digest() for r in labelled}  # negatives only from the scored rows
    plain, none = training_sample(rows, 5, 0, seed=0, negatives=False)
    assert plain == labelled and none == []


def test_output_recalibration_maps_the_gated_term_back_onto_the_labelled_rows(tmp_path):
    """Labelled rows whose support says little about correctness, changed-fact pairs that fit a
    steep plausibility term, and a gate that cannot tell the constructed rows apart: the term
    spreads the labelled rows' log-odds and the gate lowers them, so unseen labelled rows read
    over-confident and low. Platt scaling of the output fixes that on them, keeps their order and
    the jurors' support direction, and is saved with the calibrator."""
    from sklearn.metrics import log_loss

    from jury.calibrator import MONOTONE_FEATURES, raise_support

    def rows_with_weak_support_signal(seed: int):
        x, labels, constructed, pairs = _with_changed_facts(400, seed=seed, drop=2.0)
        given = FEATURES.index("jury_logp_given")
        x[:400, given] += 0.6 * labels[:400]
        x[400:, given] += 0.6  # each changed copy keeps its correct row's shift
        return x, labels, constructed, pairs

    x, labels, constructed, pairs = rows_with_weak_support_signal(35)
    config = CalibratorConfig(
        seed=0, probe_layer=None, gate_features=("jury_pmi",), candidates=("monotone logistic", "base rate")
    )
    plain = fit_calibrator(x, labels, config, None, constructed, pairs)
    scaled = fit_calibrator(x, labels, config.model_copy(update={"recalibrate_output": True}), None, constructed, pairs)
    assert plain.output_recalibration is None and scaled.output_recalibration[0] > 0
    test_x, test_labels, test_constructed, _ = rows_with_weak_support_signal(36)
    rows, truth = test_x[~test_constructed], test_labels[~test_constructed]
    p_plain, p_scaled = plain.predict(rows), scaled.predict(rows)
    assert log_loss(truth, p_scaled) < log_loss(truth, p_plain) - 0.02
    assert abs(p_scaled.mean() - truth.mean()) < abs(p_plain.mean() - truth.mean())
    assert np.all(np.diff(p_scaled[np.argsort(p_plain, kind="stable")]) >= -1e-12)  # the same order
    assert scaled.metrics["validation_ece"] < plain.metrics["validation_ece"]  # out of fold, both
    for feature in MONOTONE_FEATURES:
        assert np.all(scaled.predict(raise_support(rows, FEATURES, feature, 1.0)) >= p_scaled - 1e-9), feature
    save_calibrator(scaled, tmp_path)
    assert np.allclose(load_calibrator(tmp_path).predict(rows), p_scaled)


def test_output_recalibration_is_left_out_when_the_output_ranks_labelled_rows_below_chance():
    """Labelled rows whose support says nothing: a Platt fit on them finds no positive slope, and a
    flat or flipped map would undo the gate, so the calibrator keeps its output unscaled."""
    x, labels, constructed, pairs = _with_changed_facts(400, seed=35, drop=2.0)
    config = CalibratorConfig(
        seed=0,
        probe_layer=None,
        gate_features=("jury_pmi",),
        candidates=("monotone logistic", "base rate"),
        plausibility_features=("jury_logp_given",),
        recalibrate_output=True,
    )
    calibrator = fit_calibrator(x, labels, config, None, constructed, pairs)
    assert calibrator.metrics["output_recalibration_slope"] <= 0 and calibrator.output_recalibration is None


def test_a_failed_check_lowers_p_correct_by_a_shift_fitted_on_every_labelled_row():
    """Scored rows and probe rows where a failed arithmetic check goes mostly with wrong answers:
    the probe candidate learns a negative shift for it from both, with the probe's weight as
    before; the fitted calibrator never raises P(correct) for a failed check."""
    from jury.calibrator import is_monotone

    labels, states = _probe_world(60, 1)
    extra_labels, extra_states = _probe_world(600, 2)
    rng = np.random.default_rng(7)
    x = _features(rng, 60)
    x[:, FEATURES.index("arithmetic_slip")] = (labels == 0) & (rng.random(60) < 0.3)
    extra_checks = ((extra_labels == 0) & (rng.random(600) < 0.3)).astype(float)[:, None]
    extra_checks[np.flatnonzero(extra_labels == 1)[:3]] = 1.0  # a few correct answers slip too
    config = CalibratorConfig(probe_layer=20, seed=0)
    fitted = fit_calibrator(
        x, labels, config, states, probe_rows=(extra_states, extra_labels), probe_checks=extra_checks
    )
    shift = fitted.metrics["check_shift arithmetic_slip"]
    assert shift < -1.0 and fitted.coef[fitted.features.index("arithmetic_slip")] == pytest.approx(shift)
    assert "failing a check" in fitted.trained_on["candidate"]
    test_x = np.column_stack([np.zeros((50, len(FEATURES))), fitted.probe.logits(_probe_world(50, 3)[1])])
    assert is_monotone(fitted, test_x)
    off = fit_calibrator(
        x, labels, config.model_copy(update={"text_checks": False}), states,
        probe_rows=(extra_states, extra_labels), probe_checks=extra_checks,
    )  # fmt: skip
    assert off.coef[off.features.index("arithmetic_slip")] == 0.0


def test_a_check_that_fails_only_on_correct_answers_gets_no_shift():
    from jury.calibrator import fit_probe_scaling

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    logits = 2.0 * (labels - 0.5) + rng.normal(0, 1, 400)
    checks = ((labels == 1) & (rng.random(400) < 0.2)).astype(float)[:, None]
    slope, _, shifts = fit_probe_scaling(logits, checks, labels, prior_scale=2.0)
    assert slope > 0 and shifts[0] == 0.0  # bounded at 0: a failed check never counts for an answer
    none = np.zeros((400, 1))
    assert fit_probe_scaling(logits, none, labels, 2.0)[2][0] == 0.0
