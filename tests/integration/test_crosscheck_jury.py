"""The cross-check jury on the real SmolLM2 with real registered LoRA experts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from experts.types import BASE_EXPERT
from jury.jury import Jury, JuryConfig
from registry import Registry
from registry.errors import ConflictError, MoseError, NotFoundError
from router_model.runtime import FallbackRouter
from tests._fixtures.experts import write_lora_expert


@pytest.fixture(scope="module")
def jury_home(base_models, on_idle_cores, tmp_path_factory):
    """A data directory with two active LoRA experts (law, medicine); the module's models run on
    every idle core (:func:`tests._fixtures.experts.idle_cores`)."""
    from registry.home import MoseHome

    home = MoseHome.from_env(tmp_path_factory.mktemp("jury-home"))
    folder = tmp_path_factory.mktemp("jury-experts")
    with Registry.open(home) as reg:
        for seed, (name, domain) in enumerate([("law-juror", "law"), ("med-juror", "medicine")]):
            reg.add(write_lora_expert(folder, name, seed=seed, domain=domain))
            reg.activate(name)
    return home


@pytest.fixture(scope="module")
def jury(jury_home):
    from experts.pool import ExpertPool

    registry = Registry.open(jury_home)
    pool = ExpertPool.from_registry(registry, home=jury_home)
    return Jury(pool, FallbackRouter(), registry, config=JuryConfig(k=3))


def test_verdict_on_a_real_pair_has_every_field(jury):
    verdict = jury.crosscheck("What is the capital of France?", "The capital of France is Paris.")
    assert verdict.id.startswith("vrd-")
    assert 0.0 <= verdict.p_correct <= 1.0
    assert verdict.flagged == (verdict.p_correct < verdict.threshold)
    assert [j.expert for j in verdict.jurors] == ["law-juror", "med-juror", BASE_EXPERT]
    for juror in verdict.jurors:
        assert juror.weight > 0 and juror.answer_tokens > 0
        assert juror.pmi == pytest.approx(juror.logp_given_question - juror.logp_without_question)
        assert juror.vote is not None
    assert set(verdict.evidence) >= {"jury_pmi", "base_pmi", "log_answer_tokens"}


def test_the_answer_matters_to_the_evidence(jury):
    right = jury.crosscheck("What is the capital of France?", "Paris is the capital of France.")
    odd = jury.crosscheck("What is the capital of France?", "Bananas are rich in potassium.")
    base = {v.id: next(j for j in v.jurors if j.expert == BASE_EXPERT) for v in (right, odd)}
    assert base[right.id].pmi > base[odd.id].pmi


def test_a_bf16_pool_reads_the_same_evidence_within_bf16_rounding(jury, jury_home):
    """DevicePolicy.cpu_dtype="bfloat16" (MOSE_CPU_DTYPE): the model runs in bf16 on CPU, the same
    jurors score, each log-prob within bf16's rounding of float32's, and the answer still matters."""
    import torch

    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    config = PoolConfig(policy=DevicePolicy(cpu_dtype="bfloat16"))
    pool = ExpertPool.from_registry(Registry.open(jury_home), config, home=jury_home)
    assert pool.dtype == "bfloat16" and {p.dtype for p in pool._base.parameters()} == {torch.bfloat16}
    bf16 = Jury(pool, FallbackRouter(), jury.registry, config=JuryConfig(k=3))
    question = "What is the capital of France?"
    verdicts = {
        name: [
            j.crosscheck(question, answer)
            for answer in ("Paris is the capital of France.", "Bananas are rich in potassium.")
        ]
        for name, j in (("fp32", jury), ("bf16", bf16))
    }
    for ours, theirs in zip(verdicts["bf16"], verdicts["fp32"], strict=True):
        assert [j.expert for j in ours.jurors] == [j.expert for j in theirs.jurors]
        for mine, reference in zip(ours.jurors, theirs.jurors, strict=True):
            assert mine.logp_given_question == pytest.approx(reference.logp_given_question, abs=0.1)
            assert mine.logp_without_question != reference.logp_without_question  # really another precision
    right, odd = ({j.expert: j.pmi for j in v.jurors} for v in verdicts["bf16"])
    assert right[BASE_EXPERT] > odd[BASE_EXPERT]


def test_k_larger_than_the_experts_uses_them_all_and_k_zero_only_the_base(jury):
    assert [e for e, _ in jury.select("Is a verbal contract binding?", k=10)] == ["law-juror", "med-juror", BASE_EXPERT]
    verdict = jury.crosscheck("Is a verbal contract binding?", "Often, yes.", k=0)
    assert [j.expert for j in verdict.jurors] == [BASE_EXPERT]


@pytest.mark.parametrize(
    "question, answer",
    [
        ("巴黎是哪个国家的首都？", "巴黎是法国的首都。"),
        ("ما هي عاصمة فرنسا؟", "باريس"),
        ("Explain the history of Rome.", "Rome was founded long ago. " * 2000),
    ],
)
def test_other_scripts_and_very_long_answers_get_a_verdict(jury, question, answer):
    verdict = jury.crosscheck(question, answer)
    assert 0.0 <= verdict.p_correct <= 1.0
    assert all(j.answer_tokens <= jury.pool.config.score_max_tokens for j in verdict.jurors)


def test_empty_answer_is_flagged_and_blank_question_refused(jury):
    verdict = jury.crosscheck("What is 2 + 2?", "   ")
    assert verdict.flagged and verdict.p_correct == 0.0 and verdict.jurors == []
    with pytest.raises(MoseError, match="the question must be a non-empty string"):
        jury.crosscheck("  ", "4")


def test_no_active_experts_leaves_the_base_model_alone(base_models, tmp_path):
    from experts.pool import ExpertPool
    from registry.home import MoseHome

    home = MoseHome.from_env(tmp_path / "empty")
    registry = Registry.open(home)
    lonely = Jury(ExpertPool.from_registry(registry, home=home), FallbackRouter(), registry)
    verdict = lonely.crosscheck("What is 2 + 2?", "4")
    assert [j.expert for j in verdict.jurors] == [BASE_EXPERT]


def test_feedback_updates_reputation_persistently_once_and_is_audited(jury, jury_home):
    verdict = jury.record(jury.crosscheck("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."))
    before = {j.expert: j.weight for j in verdict.jurors}
    weights = jury.feedback(verdict.id, correct=True)
    for juror in verdict.jurors:
        moved_up = weights[juror.expert] > before[juror.expert]
        assert moved_up == (juror.vote is True)  # right votes gain weight, wrong ones lose it
    with pytest.raises(ConflictError, match=f"feedback for verdict '{verdict.id}' was already recorded"):
        jury.feedback(verdict.id, correct=False)
    with pytest.raises(NotFoundError, match="no verdict 'vrd-nope'"):
        jury.feedback("vrd-nope", correct=True)
    with Registry.open(jury_home) as reopened:  # a restart: state comes from the database file
        for name, weight in weights.items():
            assert jury.weight(name) == pytest.approx(weight)
            assert reopened.reputation(name, prior=jury.config.reputation_prior).updated_at is not None
        actions = [(e.action, e.subject) for e in reopened.audit_entries()]
        assert ("feedback", verdict.id) in actions
        assert reopened.audit_verify().ok


def _mose(*args: str) -> subprocess.CompletedProcess:
    """``mose <args>`` in a child process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, timeout=900)


def test_cli_train_and_eval_print_the_contract(jury_home, shared_data, tmp_path):
    rows = tmp_path / "rows.jsonl"
    source = (shared_data / "crosscheck_dev.jsonl").read_text(encoding="utf-8").split("\n")
    rows.write_text("\n".join(source[:400]), encoding="utf-8")
    env_home = ["--home", str(jury_home.root)]
    saved = tmp_path / "evidence.jsonl"
    train = _mose(
        "crosscheck", "train", "--data", str(rows), "--limit", "5", "--json", "--save-evidence", str(saved), *env_home
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads(train.stdout)["version"].startswith("v")
    eval_evidence = tmp_path / "eval-evidence.jsonl"
    plots = tmp_path / "plots"
    run = _mose(
        "crosscheck",
        "eval",
        "--data",
        str(rows),
        "--limit",
        "2",
        "--json",
        "--save-evidence",
        str(eval_evidence),
        "--plots",
        str(plots),
        *env_home,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)  # exactly one JSON object on stdout
    assert "cross-check evidence" in run.stderr  # the long part shows progress, beside the JSON
    reused = _mose(
        "crosscheck", "eval", "--data", str(rows), "--limit", "2", "--json", "--evidence", str(eval_evidence), *env_home
    )
    assert reused.returncode == 0, reused.stderr[-2000:]
    assert json.loads(reused.stdout) == {k: v for k, v in report.items() if k != "plots"}  # the same draw,
    # figures and saved timings, without scoring
    assert sorted(p.name for p in plots.iterdir()) == ["reliability.png", "roc.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots.iterdir())
    assert "cross-check evidence" not in reused.stderr
    assert {
        "n",
        "auroc",
        "auprc",
        "ece",
        "flag_precision",
        "flag_recall",
        "per_source",
        "baselines",
        "seconds_per_item",
    } <= report.keys()
    assert {"base_model_pmi", "best_single_expert", "jury_uncalibrated"} <= report["baselines"].keys()
    assert 0 <= report["ece_if_calibrated"]["mean"] <= report["ece_if_calibrated"]["p95"] <= 1
    assert all({"n", "auroc"} <= v.keys() for v in report["per_source"].values())
    labelled = {k: v for k, v in report["per_source"].items() if not v.get("constructed")}
    constructed = {k: v for k, v in report["per_source"].items() if v.get("constructed")}
    assert report["n"] == sum(v["n"] for v in labelled.values()) <= 2 * len(labelled)  # --limit 2 per source
    assert constructed and all(k.startswith(("swapped_", "perturbed_")) for k in constructed)
    assert all(0 <= v["flagged"] <= 1 for v in constructed.values())
    check = _mose("crosscheck", "check", "What is 2 + 2?", "4", "--json", *env_home)
    assert check.returncode == 0, check.stderr[-2000:]
    verdict = json.loads(check.stdout)
    assert "base_probe" in verdict["evidence"]  # the calibrator's probe read the base model's state
    assert all("answer_state" not in juror for juror in verdict["jurors"])

    def retrain(*args: str) -> subprocess.CompletedProcess:
        """``crosscheck train`` on the first training run's draw of rows, with ``args`` added."""
        return _mose("crosscheck", "train", "--data", str(rows), "--limit", "5", "--json", *args, *env_home)

    # the evidence the first training run saved refits the same calibrator without scoring again
    first, again = train, retrain("--evidence", str(saved))
    assert again.returncode == 0, again.stderr[-2000:]
    fits = [
        json.loads((jury_home.crosscheck_dir / f"{json.loads(out.stdout)['version']}.json").read_text())
        for out in (first, again)
    ]
    model = (
        "method",
        "features",
        "coef",
        "intercept",
        "trees",
        "iso_x",
        "iso_y",
        "threshold",
        "probe",
        "voter",
        "plausibility",
        "trained_on",
    )
    first, second = ({key: fit[key] for key in model} for fit in fits)
    assert first == second and fits[0]["recalibration"] is None  # no Platt scaling by default
    assert fits[0]["trained_on"]["pool_dtype"] == "float32"  # the tests' MOSE_CPU_DTYPE
    mix = fits[0]["trained_on"]["negatives"]  # constructed wrong answers beside the labelled rows
    assert mix["labelled"] > 0 and mix["swapped"] > 0 and mix["swapped_cross"] > 0
    assert sum(mix.values()) == fits[0]["trained_on"]["rows"]
    assert first["features"][-1] == "base_probe" and first["probe"]["layer"] == 20  # the default probe
    assert first["voter"]["probe"] is None  # the experts' votes are read without it
    assert len(saved.read_text().splitlines()) == fits[0]["trained_on"]["rows"]

    # evidence saved before the probe existed (no answer states) is completed, not refused
    import numpy as np

    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    stripped, refilled = tmp_path / "no-states.jsonl", tmp_path / "refilled.jsonl"
    stripped.write_text("".join(json.dumps({**e, "answer_state": None, "state_layer": None}) + "\n" for e in lines))
    fill = retrain("--evidence", str(stripped), "--save-evidence", str(refilled))
    assert fill.returncode == 0, fill.stderr[-2000:]
    assert "answer states (layer 20)" in fill.stderr
    again_states = [json.loads(line) for line in refilled.read_text().splitlines()]
    assert [e["state_layer"] for e in again_states] == [20] * len(lines)
    assert np.allclose([e["answer_state"] for e in again_states], [e["answer_state"] for e in lines], atol=1e-3)
    without = retrain("--evidence", str(stripped), "--no-probe")
    assert without.returncode == 0 and "answer states" not in without.stderr, without.stderr[-2000:]
    plain = json.loads((jury_home.crosscheck_dir / f"{json.loads(without.stdout)['version']}.json").read_text())
    assert plain["probe"] is None and "base_probe" not in plain["features"]
    assert plain["plausibility"] is None and fits[0]["plausibility"] is None  # no term by default
    termed = retrain("--evidence", str(saved), "--plausibility-features", "jury_logp_given")
    assert termed.returncode == 0, termed.stderr[-2000:]
    termed_fit = json.loads((jury_home.crosscheck_dir / f"{json.loads(termed.stdout)['version']}.json").read_text())
    # the term is fitted on the changed-fact answers among the training rows, when there are any
    assert (termed_fit["plausibility"] is not None) == (mix["perturbed"] > 0)
    tuned = retrain("--evidence", str(saved), "--recalibrate", "--average-probe-folds")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    tuned_fit = json.loads((jury_home.crosscheck_dir / f"{json.loads(tuned.stdout)['version']}.json").read_text())
    assert len(tuned_fit["recalibration"]) == 2 and len(tuned_fit["voter"]["recalibration"]) == 2
    assert set(tuned_fit["probe"]["mean"]) == {0.0} and tuned_fit["probe"]["coef"] != fits[0]["probe"]["coef"]

    # more rows for the probe alone: only their answer states are read, and they count as seen
    wider = retrain("--evidence", str(saved), "--probe-rows", "3")
    assert wider.returncode == 0 and "probe states (layer 20)" in wider.stderr, wider.stderr[-2000:]
    wider_fit = json.loads((jury_home.crosscheck_dir / f"{json.loads(wider.stdout)['version']}.json").read_text())
    added = wider_fit["trained_on"]["probe_rows"]
    assert 0 < added <= 3 * len(fits[0]["trained_on"]["sources"])
    assert "probe negatives (layer 20)" in wider.stderr  # wrong answers made from those rows, for the probe
    assert wider_fit["trained_on"]["probe_negatives"]["labelled"] == 0
    assert wider_fit["trained_on"]["candidate"].startswith("probe, Platt-scaled on")
    assert len(wider_fit["trained_on"]["row_digests"]) == fits[0]["trained_on"]["rows"] + added
    assert wider_fit["probe"]["coef"] != fits[0]["probe"]["coef"]
    assert wider_fit["metrics"]["train_rows"] == fits[0]["metrics"]["train_rows"]  # the candidate's rows
    for bad, message in (
        (["--probe-rows", "-1"], "--probe-rows must be 0 or more, got -1"),
        (["--probe-rows", "2", "--no-probe"], "--probe-rows needs the truthfulness probe"),
    ):
        refused = retrain("--evidence", str(saved), *bad)
        assert refused.returncode != 0 and message in refused.stderr and refused.stdout == "", refused.stderr[-2000:]

    # evaluation evidence belongs to its draw: under this calibrator (its training rows grew by the
    # probe's) the draw is another, and the saved evidence is refused
    stale = _mose(
        "crosscheck", "eval", "--data", str(rows), "--limit", "2", "--json", "--evidence", str(eval_evidence), *env_home
    )
    assert stale.returncode != 0 and "have no saved evidence" in stale.stderr, stale.stderr[-2000:]
    assert stale.stdout == ""
    assert len(eval_evidence.read_text().splitlines()) == report["n"] + sum(v["n"] for v in constructed.values())

    from jury.calibrator import load_calibrator
    from jury.crosscheck import evaluate, load_rows

    calibrator = load_calibrator(jury_home.crosscheck_dir)
    trained = set(calibrator.trained_on["row_digests"])
    seen_rows = [r for r in load_rows(rows) if r.digest() in trained]
    assert seen_rows and not any(r.is_test() for r in seen_rows)  # training never touched the test bucket
    judge = Jury(None, None, None, calibrator)
    with pytest.raises(MoseError, match="every row given was used to train the calibrator"):
        evaluate(judge, seen_rows, progress=False)


def test_own_answers_fill_each_juror_and_the_agreement_evidence(jury):
    from router_model.embedder import MiniLMEmbedder

    jury.embedder = embedder = MiniLMEmbedder()
    try:
        verdict = jury.crosscheck("What is the capital of France?", "Paris", k=2, own_answers=True)
        encoder = embedder._encoder
        jury.crosscheck("What is the capital of Spain?", "Madrid", k=2, own_answers=True)
    finally:
        jury.embedder = None
    assert encoder is not None and embedder._encoder is encoder  # MiniLM loads once, not per verdict
    assert isinstance(verdict.agreement, bool)
    assert verdict.evidence["agreement"] == (1.0 if verdict.agreement else -1.0)
    for juror in verdict.jurors:
        assert juror.own_answer and -1.0 <= juror.similarity <= 1.0001
    with pytest.raises(MoseError, match="own answers need a sentence embedder"):
        jury.crosscheck("What is the capital of France?", "Paris", own_answers=True)


def test_a_bad_juror_loses_weight_through_feedback_and_the_jury_recovers(jury, shared_data):
    """An adapter fine-tuned on shuffled question/answer pairs sits on every jury; feedback on
    24 verdicts cuts its weight, and the jury's AUROC on other pairs is back within 0.02 of the
    jury without it. (benchmarks/jury.py reputation runs the same on crosscheck_dev rows.)"""
    import random

    from sklearn.metrics import roc_auc_score

    from experts.finetune import FinetuneConfig, QAPair, load_base_for_training, load_pairs, train_lora
    from jury.checks import text_checks
    from jury.jury import features

    pairs = load_pairs(shared_data / "sft" / "general_knowledge.jsonl")
    random.Random(0).shuffle(pairs)
    train, probe = pairs[:200], pairs[200:236]
    answers = [p.answer for p in train]
    random.Random(1).shuffle(answers)
    model, tokenizer = load_base_for_training()
    # peak 6e-3: the schedule decays linearly, so the mean rate is about the 3e-3 a bad juror needs
    config = FinetuneConfig(steps=20, batch_size=8, learning_rate=6e-3, top_layers=10, max_tokens=48)
    _, adapter = train_lora(
        model, tokenizer, [QAPair(p.question, a) for p, a in zip(train, answers)], config, progress=False
    )
    jury.pool.add_adapter("shuffled-juror", adapter.lora_config, adapter.state_dict)
    try:
        # right answers and answers of other questions, alternating
        items = [
            (p.question, p.answer if i % 2 == 0 else probe[(i + 7) % len(probe)].answer, i % 2 == 0)
            for i, p in enumerate(probe)
        ]
        feedback, heldout = items[:24], items[24:]
        for question, answer, correct in feedback:
            verdict = jury.record(jury.crosscheck(question, answer))
            assert "shuffled-juror" in {j.expert for j in verdict.jurors}
            jury.feedback(verdict.id, correct=correct)
        weights = {name: jury.weight(name) for name in ("law-juror", "med-juror", "shuffled-juror", BASE_EXPERT)}
        # law-juror is a random adapter, itself a poor judge; base and med-juror judge well
        assert weights["shuffled-juror"] < min(weights[BASE_EXPERT], weights["med-juror"]) / 3, weights

        evidence = [(q, a, jury.evidence(q, a, jury.select(q)), ok) for q, a, ok in heldout]

        def auroc(seat_bad: bool) -> float:
            scores = [
                jury.probability(
                    features(
                        [j for j in jurors if seat_bad or j.expert != "shuffled-juror"], q, text_checks(q, a), None
                    )
                )
                for q, a, jurors, _ in evidence
            ]
            return roc_auc_score([ok for *_, ok in evidence], scores)

        assert auroc(seat_bad=True) >= auroc(seat_bad=False) - 0.02
    finally:
        jury.pool.remove("shuffled-juror")
