"""Router benchmark: the learned router against the three baselines on held-out rows.

    .venv/bin/python benchmarks/router.py [--home DIR] [--data FILE] [--train --data-train FILE] [--json FILE]

Evaluates the current router artifact of ``--home`` (default ``$MOSE_HOME`` or ``./.mose``) on
its own held-out rows (or ``--data``), exactly as ``mose router eval`` does, and prints a table:
accuracy overall and per source for the router and each baseline (fitted in the same run on the
router's training rows), then calibration, abstention, latency and throughput; ``--json`` also
writes the whole report to FILE. ``--train`` first trains a router on ``--data-train`` (default
../shared/data/routing_dev.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._report import write_json  # noqa: E402

DEFAULT_TRAIN = REPO_ROOT.parent / "shared" / "data" / "routing_dev.jsonl"


def table(report: dict) -> str:
    sources = sorted(report["per_source"])
    names = ["router (ours)", *report["baselines"]]
    header = ["model", "overall", *sources]
    rows = [["n", str(report["n"]), *(str(report["per_source"][s]["n"]) for s in sources)]]
    rows.append(
        ["router (ours)", f"{report['accuracy']:.4f}", *(f"{report['per_source'][s]['accuracy']:.4f}" for s in sources)]
    )
    for name in names[1:]:
        per = report["baselines_per_source"][name]
        rows.append([name, f"{report['baselines'][name]:.4f}", *(f"{per[s]['accuracy']:.4f}" for s in sources)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
    lines += [
        "",
        f"router {report['router_version']} ({report['onnx_file']}, {report['provider']}): "
        f"macro-F1 {report['macro_f1']:.4f}, ECE {report['ece']:.4f}, abstain rate {report['abstain_rate']:.4f}, "
        f"accuracy when answered {report['accuracy_when_answered']:.4f}",
        f"single-query latency p50 {report['latency_ms']['p50']:.2f} ms, p99 {report['latency_ms']['p99']:.2f} ms; "
        f"batched {report['batch_qps']:.0f} queries/s (route_batch, tokenisation included)",
        f"(accuracy counts an abstention as wrong; baselines never abstain; timings taken at 1-min load "
        f"average {report['load_average_1m']} on {report['cpu_count']} cores)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=None, help="mose data directory (default $MOSE_HOME or ./.mose)")
    parser.add_argument("--data", default=None, help="labelled rows to score (default: the artifact's held-out rows)")
    parser.add_argument("--train", action="store_true", help="train a router first")
    parser.add_argument("--data-train", default=str(DEFAULT_TRAIN), help="labelled file to train on with --train")
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the full report to this JSON file")
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)

    from registry import Registry
    from registry.home import MoseHome
    from router_model.artifact import HELDOUT_ROWS
    from router_model.data import load_jsonl
    from router_model.evaluate import evaluate
    from router_model.runtime import OnnxRouter

    home = MoseHome.from_env(args.home)
    with contextlib.redirect_stdout(sys.stderr):
        registry = Registry.open(home)
        if args.train:
            from router_model.service import train_and_publish

            train_and_publish(home, [args.data_train], registry)
        router = OnnxRouter.load(home, registry=registry)
        rows = load_jsonl(args.data or router.directory / HELDOUT_ROWS)
        report = evaluate(router, rows, cache_dir=home.cache_dir / "router-baselines",
                          latency_samples=args.latency_samples)  # fmt: skip
    print(table(report))
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
