"""``mose router``: train, update, evaluate, split and query the learned router.

mose router train [--data FILE ...] [--epochs N] [--fine-tune auto|yes|no] [RouterConfig flags]
mose router update                       # add head rows for newly activated experts' domains
mose router eval [--data FILE] --json [--plots DIR]
mose router route "query" [--json]
mose router split --data FILE --out DIR  # the held-out split training uses, as files
mose router status [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from router_model.config import RouterConfig
from serve.commands._common import add_common_flags, emit, home_of
from serve.commands._config_args import add_config_arguments, config_from_args

# RouterConfig fields that are flags of `mose router train` (the rest are set from Python).
ROUTER_TRAIN_FLAGS = (
    "epochs",
    "fine_tune",
    "max_rows_per_label",
    "encoder_layers",
    "tune_layers",
    "max_length",
    "batch_size",
    "lr",
    "head_lr",
    "head_epochs",
    "lexical_bag",
    "neighbours",
    "seed",
    "threads",
    "heldout_fraction",
    "validation_fraction",
    "target_precision",
    "min_threshold",
    "quantize",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("router", help="train, update, evaluate and query the learned router")
    sub = parser.add_subparsers(dest="router_command", metavar="ACTION")

    train = sub.add_parser("train", help="full training on labelled files + the active experts' example queries")
    add_common_flags(train)
    train.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="labelled JSONL (query, domain, optional source/id); repeatable",
    )
    add_config_arguments(train, RouterConfig, ROUTER_TRAIN_FLAGS)
    train.add_argument(
        "--exclude-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="leave a domain out of training (e.g. to test incremental updates)",
    )
    train.add_argument("--no-registry", action="store_true", help="ignore the registry's experts")
    train.set_defaults(func=cmd_train)

    update = sub.add_parser("update", help="add newly activated experts' domains without retraining the encoder")
    add_common_flags(update)
    update.set_defaults(func=cmd_update)

    evaluate = sub.add_parser("eval", help="accuracy, calibration, latency and baselines on labelled rows")
    add_common_flags(evaluate)
    evaluate.add_argument(
        "--data", default=None, metavar="FILE", help="labelled JSONL (default: the current artifact's held-out rows)"
    )
    evaluate.add_argument("--plots", default=None, metavar="DIR", help="write confusion matrix + reliability PNGs")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the three baselines")
    evaluate.add_argument("--latency-samples", type=int, default=300, help="single queries timed (default 300)")
    evaluate.set_defaults(func=cmd_eval)

    route = sub.add_parser("route", help="route one query")
    add_common_flags(route)
    route.add_argument("query", help="the query text")
    route.set_defaults(func=cmd_route)

    split = sub.add_parser("split", help="write the train / held-out split of a labelled file")
    add_common_flags(split, json_flag=False)
    split.add_argument("--data", required=True, metavar="FILE", help="labelled JSONL")
    split.add_argument("--out", required=True, metavar="DIR", help="output folder")
    split.set_defaults(func=cmd_split)

    status = sub.add_parser("status", help="the current router version, labels and metrics")
    add_common_flags(status)
    status.set_defaults(func=cmd_status)

    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def open_registry(home, wanted: bool = True):
    """The registry of ``home`` (read-only use), or None when not wanted."""
    if not wanted:
        return None
    from registry import Registry

    return Registry.open(home)


def cmd_train(args: argparse.Namespace) -> int:
    from router_model.service import train_and_publish

    home = home_of(args)
    config = config_from_args(RouterConfig, args, what="router settings")
    registry = open_registry(home, not args.no_registry)
    with contextlib.redirect_stdout(sys.stderr):
        directory = train_and_publish(home, args.data, registry, config, exclude_domains=args.exclude_domain)
    from router_model.artifact import read_metadata

    metadata = read_metadata(directory, verify=False)
    payload = {
        "version": metadata.version,
        "path": str(directory),
        "fine_tuned": metadata.fine_tuned,
        "labels": metadata.labels,
        "temperature": metadata.temperature,
        "threshold": metadata.threshold,
        "onnx_file": metadata.onnx_file,
        "metrics": metadata.metrics,
    }
    emit(
        args,
        payload,
        f"router {metadata.version} written to {directory} "
        f"({'fine-tuned' if metadata.fine_tuned else 'head only'}, validation accuracy "
        f"{metadata.metrics.get('val_accuracy', 0):.4f}, {metadata.onnx_file})",
    )
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from router_model.artifact import current_dir
    from serve.activation import teach_router

    home = home_of(args)
    current_dir(home.router_dir)  # no router yet: its error says how to train one
    with contextlib.redirect_stdout(sys.stderr):
        # Steps 2 and 3 of an activation: learn the new domains, publish (a running server loads it).
        result = teach_router(home, open_registry(home))
    text = (
        f"router {result.version}: added {', '.join(result.added_domains)} in {result.seconds} s"
        if result.added_domains
        else f"router {result.version} already covers every active expert's domain"
    )
    emit(args, result.as_json(), text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from router_model.artifact import HELDOUT_ROWS
    from router_model.data import load_jsonl
    from router_model.evaluate import evaluate
    from router_model.runtime import OnnxRouter

    home = home_of(args)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries exactly one JSON object
        router = OnnxRouter.load(home, registry=open_registry(home))
        rows = load_jsonl(args.data or router.directory / HELDOUT_ROWS)
        report = evaluate(
            router,
            rows,
            baselines=not args.no_baselines,
            cache_dir=home.cache_dir / "router-baselines",
            plots_dir=Path(args.plots) if args.plots else None,
            latency_samples=args.latency_samples,
        )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    lines = [
        f"router {report['router_version']} on {report['n']} rows ({report['provider']}, {report['onnx_file']})",
        f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  ECE {report['ece']:.4f}  "
        f"abstain {report['abstain_rate']:.4f}  accuracy when answered {report['accuracy_when_answered']:.4f}",
        f"latency p50 {report['latency_ms']['p50']} ms  p99 {report['latency_ms']['p99']} ms  batch {report['batch_qps']} q/s",
    ]
    lines += [
        f"  {source:12s} n={v['n']:5d}  accuracy {v['accuracy']:.4f}" for source, v in report["per_source"].items()
    ]
    lines += [f"baseline {name}: {acc:.4f}" for name, acc in report["baselines"].items()]
    return "\n".join(lines)


def cmd_route(args: argparse.Namespace) -> int:
    from router_model.runtime import OnnxRouter

    home = home_of(args)
    router = OnnxRouter.load(home, registry=open_registry(home))
    decision = router.route(args.query)
    payload = {**decision.model_dump(), "router_version": router.version, "provider": router.provider}
    alternatives = ", ".join(f"{t.domain} {t.p:.3f}" for t in decision.top_k)
    emit(
        args,
        payload,
        f"{decision.domain} -> {decision.expert} (confidence {decision.confidence:.3f}"
        f"{', abstained' if decision.abstained else ''}; top: {alternatives}; {router.provider})",
    )
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from router_model.service import write_split

    result = write_split(args.data, args.out)
    for name, info in result.items():
        print(f"{name}: {info['rows']} rows -> {info['path']} (sha256 {info['sha256'][:16]})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from router_model.artifact import current_dir, read_metadata, versions

    home = home_of(args)
    directory = current_dir(home.router_dir)
    metadata = read_metadata(directory, verify=True)
    payload = {
        **metadata.model_dump(exclude={"files", "config"}),
        "path": str(directory),
        "versions": versions(home.router_dir),
    }
    emit(
        args,
        payload,
        f"router {metadata.version} ({len(metadata.labels)} domains: {', '.join(metadata.labels)}); "
        f"threshold {metadata.threshold:.3f}, T {metadata.temperature:.3f}, {metadata.onnx_file}",
    )
    return 0
