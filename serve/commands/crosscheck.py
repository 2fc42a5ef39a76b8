"""``mose crosscheck``: train and evaluate the jury's calibrator, check one answer, give feedback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jury.calibrator import CalibratorConfig
from serve.commands._common import add_common_flags, emit, home_of
from serve.commands._config_args import add_config_arguments, config_from_args

# CalibratorConfig fields that are flags of `mose crosscheck train` (its seed is --seed, shared with the sample).
CALIBRATOR_FLAGS = (
    "target_flag_precision",
    "max_flag_probability",
    "folds",
    "candidates",
    "boosted_trees",
    "probe_layer",
    "probe_average_folds",
    "probe_negatives",
    "probe_candidate",
    "text_checks",
    "check_prior_scale",
    "off_topic_share",
    "plausibility_features",
    "plausibility_strength",
    "recalibrate",
    "recalibrate_output",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "crosscheck", help="cross-check answers from a large model with a jury of experts", description=__doc__
    )
    actions = parser.add_subparsers(dest="crosscheck_action", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="fit the calibrator on labelled rows (question, answer, label)",
        description="Fit the calibrator that turns jury evidence into P(correct), and the "
        "flag threshold. Only rows in the train bucket of their id hash are used.",
    )
    _data_flags(train)
    train.add_argument(
        "--evidence",
        action="append",
        default=[],
        metavar="FILE",
        help="reuse jury evidence saved earlier with --save-evidence (same experts and --k) "
        "instead of scoring the rows again; scoring is the slow part (repeatable)",
    )
    train.add_argument(
        "--save-evidence",
        metavar="FILE",
        default=None,
        help="also write the jury evidence used, as JSONL, for a later --evidence",
    )
    train.add_argument(
        "--answer-only-adapters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="jurors' adapters apply only where answer tokens are predicted; the question is "
        "read once by the base model for all jurors (about 1.2x faster evidence, as good "
        "on crosscheck_dev). --no-answer-only-adapters: adapters read the question too. "
        "The calibrator remembers it: eval, check and the server then score the same way "
        "(default: answer only)",
    )
    add_config_arguments(
        train,
        CalibratorConfig,
        CALIBRATOR_FLAGS,
        names={"probe_average_folds": ("--probe-average-folds", "--average-probe-folds")},
        metavars={"probe_layer": "N", "candidates": "FAMILY"},
    )
    train.add_argument(
        "--probe-rows",
        type=int,
        default=0,
        metavar="N",
        help="also N more train-bucket rows per source, besides the sampled ones, for the truthfulness "
        "probe alone: only the base model's answer state is read for them (about 0.1 s a row on "
        "a 2-core CPU, against about 0.7 s for the jury's evidence); the "
        "probe reads better with more rows (default 0)",
    )
    train.add_argument(
        "--no-probe",
        action="store_true",
        help="no truthfulness probe: the calibrator reads the jurors' likelihoods only",
    )
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser(
        "eval",
        help="AUROC/ECE/flag precision against baselines on unseen rows",
        description="Evaluate the jury on rows the calibrator never saw; prints one "
        "JSON object with --json. The overall figures are on the labelled rows; wrong "
        "answers constructed from the evaluated rows (swapped_*, perturbed_*) appear "
        "under per_source with their AUROC against the rows they were made from and "
        "the share flagged.",
    )
    _data_flags(evaluate)
    evaluate.add_argument(
        "--evidence",
        action="append",
        default=[],
        metavar="FILE",
        help="reuse jury evidence saved earlier by eval --save-evidence (same rows, experts "
        "and --k) instead of scoring again, e.g. to evaluate a newly trained calibrator "
        "on the same draw; seconds_per_item is then the saved run's (repeatable)",
    )
    evaluate.add_argument(
        "--save-evidence",
        metavar="FILE",
        default=None,
        help="also write the jury evidence of the rows evaluated, as JSONL, for a later --evidence",
    )
    evaluate.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="also draw the reliability diagram and each source's ROC curve as PNG in DIR (needs the plots extra)",
    )
    evaluate.set_defaults(func=run_eval)

    check = actions.add_parser("check", help="the jury's verdict on one question/answer pair")
    add_common_flags(check)
    check.add_argument("question")
    check.add_argument("answer")
    check.add_argument("--k", type=int, default=3, help="experts on the jury besides the base model (default 3)")
    check.add_argument("--own-answers", action="store_true", help="jurors answer too (slower)")
    check.set_defaults(func=run_check)

    feedback = actions.add_parser("feedback", help="tell the jury whether a checked answer was correct")
    add_common_flags(feedback)
    feedback.add_argument("verdict_id")
    outcome = feedback.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--correct", dest="correct", action="store_true", help="the answer was correct")
    outcome.add_argument("--wrong", dest="correct", action="store_false", help="the answer was wrong")
    feedback.set_defaults(func=run_feedback)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)
    parser.add_argument("--data", required=True, help="JSONL rows: question, answer, label, optional source/domain/id")
    parser.add_argument("--limit", type=int, default=None, help="sample N rows per source (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-source sample (default 0)")
    parser.add_argument("--k", type=int, default=3, help="experts on the jury besides the base model (default 3)")
    parser.add_argument(
        "--no-negatives",
        dest="negatives",
        action="store_false",
        help="no constructed wrong answers (answers moved to another question, facts changed) "
        "beside the labelled rows; by default they are made from the rows used, never from "
        "rows on the other side of the train/eval split",
    )


def run_train(args: argparse.Namespace) -> int:
    from jury.calibrator import save_calibrator
    from jury.crosscheck import (
        collect,
        load_evidence,
        load_rows,
        open_jury,
        save_evidence,
        train,
        training_sample,
    )
    from jury.jury import JuryConfig
    from registry.errors import MoseError

    extra = {"probe_layer": None} if args.no_probe else {}
    if not args.negatives:
        extra["probe_negatives"] = False
    config = config_from_args(
        CalibratorConfig, args, what="calibrator settings", seed=args.seed, **extra
    )  # before any loading
    if args.probe_rows < 0:
        raise MoseError(f"--probe-rows must be 0 or more, got {args.probe_rows}")
    if args.probe_rows and args.no_probe:
        raise MoseError("--probe-rows needs the truthfulness probe: drop --no-probe")
    home = home_of(args)
    rows, probe_rows = training_sample(load_rows(args.data), args.limit, args.probe_rows, args.seed, args.negatives)
    jury = open_jury(home, JuryConfig(adapters_read_question=not args.answer_only_adapters))
    evidence = (
        load_evidence(args.evidence, rows, set(jury.pool.experts()), jury.adapters_read_question)
        if args.evidence
        else None
    )
    if evidence is None and args.save_evidence:
        evidence = collect(jury, rows, args.k, state_layer=config.probe_layer)
    # fills in missing answer states
    calibrator = train(jury, rows, config, k=args.k, evidence=evidence, probe_rows=probe_rows)
    if args.save_evidence:
        save_evidence(evidence, args.save_evidence)
    path = save_calibrator(calibrator, home.crosscheck_dir)
    summary = {
        "version": calibrator.version,
        "path": str(path),
        "method": calibrator.method,
        "threshold": calibrator.threshold,
        "metrics": calibrator.metrics,
        "best_single_expert": calibrator.trained_on.get("best_single_expert"),
    }
    emit(
        args,
        summary,
        f"calibrator {calibrator.version} ({calibrator.method}) -> {path}\n"
        f"validation AUROC {calibrator.metrics['validation_auroc']:.3f}, ECE {calibrator.metrics['validation_ece']:.3f}, "
        f"flag below P(correct) {calibrator.threshold:.3f}",
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from jury.crosscheck import (
        dumps,
        evaluate,
        evaluation_evidence,
        load_evidence,
        load_rows,
        open_jury,
        save_evidence,
        stratified_sample,
        with_negatives,
    )
    from jury.negatives import NegativesConfig

    home = home_of(args)
    jury = open_jury(home, require_calibrator=True)
    seen = set(jury.calibrator.trained_on.get("row_digests", []))
    rows = stratified_sample([r for r in load_rows(args.data) if r.digest() not in seen], args.limit, args.seed)
    rows = with_negatives(rows, NegativesConfig(seed=args.seed) if args.negatives else None)
    evidence = (
        load_evidence(args.evidence, rows, set(jury.pool.experts()), jury.adapters_read_question)
        if args.evidence
        else evaluation_evidence(jury, rows, args.k)
    )  # progress on stderr, even with --json
    report = evaluate(jury, rows, evidence=evidence, plots_dir=Path(args.plots) if args.plots else None)
    if args.save_evidence:
        save_evidence(evidence, args.save_evidence)
    if args.json:
        print(dumps(report))
    else:
        emit(args, report, None)
    return 0


def run_check(args: argparse.Namespace) -> int:
    from jury.crosscheck import open_jury

    jury = open_jury(home_of(args))
    verdict = jury.record(jury.crosscheck(args.question, args.answer, k=args.k, own_answers=args.own_answers))
    lines = [
        f"verdict {verdict.id}: P(correct) = {verdict.p_correct:.3f}"
        f"{'  FLAGGED' if verdict.flagged else ''} (threshold {verdict.threshold:.3f})"
    ]
    lines += [
        f"  {j.expert:28s} weight {j.weight:6.2f}  pmi {j.pmi:+.3f}  logp|q {j.logp_given_question:+.3f}"
        for j in verdict.jurors
    ]
    if jury.calibrator is None:
        print("warning: no calibrator trained; P(correct) is an uncalibrated squash of the jury PMI", file=sys.stderr)
    emit(args, verdict.model_dump(mode="json"), "\n".join(lines))
    return 0


def run_feedback(args: argparse.Namespace) -> int:
    from jury.jury import Jury, JuryConfig
    from registry import Registry

    registry = Registry.open(home_of(args))
    weights = Jury(None, None, registry, config=JuryConfig()).feedback(args.verdict_id, args.correct, actor="cli")
    emit(
        args,
        {"verdict_id": args.verdict_id, "correct": args.correct, "weights": weights},
        "\n".join(f"{name:28s} weight now {w:.2f}" for name, w in sorted(weights.items())),
    )
    return 0
