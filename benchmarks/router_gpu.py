"""The router's graph on ONNX Runtime's CUDA provider against its CPU provider, in one run.

    python benchmarks/router_gpu.py                              # MiniLM's config from the package
    python benchmarks/router_gpu.py --encoder-config FILE        # where the package cannot be installed
    python benchmarks/router_gpu.py --json router-gpu.json       # also write the figures as JSON

Builds the router net with all-MiniLM-L6-v2's architecture (its first ``--layers`` layers, as the
router keeps them) and seeded random weights, exports the fp32 graph and its int8 copy with the
router's own code (what ``mose router train`` writes), and times each graph on each provider: one
query per call (a request's latency) and batches of ``--batch`` (throughput), 24-token queries.
Speed is MiniLM's; routing quality is not measured here (``benchmarks/router.py`` does that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERY_TOKENS = 24  # a routed question is ~10-40 tokens


def export_graphs(encoder_config: Path, layers: int, directory: Path) -> dict[str, Path]:
    import torch
    from transformers import BertConfig

    from router_model.export import ONNX_FP32, ONNX_INT8, export_onnx, quantize_int8
    from router_model.model import net_from_config

    config = BertConfig.from_dict({**json.loads(encoder_config.read_text()), "num_hidden_layers": layers})
    torch.manual_seed(0)
    net = net_from_config(config, num_labels=10).eval()
    export_onnx(net, directory / ONNX_FP32)
    quantize_int8(directory / ONNX_FP32, directory / ONNX_INT8)
    return {"fp32": directory / ONNX_FP32, "int8": directory / ONNX_INT8}


def feed(rows: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1000, vocab, size=(rows, QUERY_TOKENS), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def timed(session, inputs: dict[str, np.ndarray], calls: int) -> list[float]:
    from router_model.export import OUTPUT_NAME

    for _ in range(max(3, calls // 10)):  # warm-up: CUDA kernels and memory arenas
        session.run([OUTPUT_NAME], inputs)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        session.run([OUTPUT_NAME], inputs)
        times.append(time.perf_counter() - started)
    return times


def measure(graphs: dict[str, Path], vocab: int, batch: int, calls: int) -> list[dict]:
    from router_model.runtime import choose_providers, open_session

    cuda, cpu = choose_providers(use_cuda=True), choose_providers(use_cuda=False)
    results = []
    for graph, path in graphs.items():
        for providers in [cuda, cpu] if cuda != cpu else [cpu]:
            session = open_session(path, providers)
            one = timed(session, feed(1, vocab, 0), calls)
            many = timed(session, feed(batch, vocab, 1), max(10, calls // 4))
            results.append(
                {
                    "graph": graph,
                    "provider": session.get_providers()[0],
                    "p50_ms": 1000 * float(np.median(one)),
                    "p95_ms": 1000 * float(np.percentile(one, 95)),
                    "batch_queries_s": batch / float(np.median(many)),
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--encoder-config",
        type=Path,
        default=None,
        help="all-MiniLM-L6-v2's config.json (default: the installed package's)",
    )
    parser.add_argument("--layers", type=int, default=3, help="encoder layers the router keeps (RouterConfig default)")
    parser.add_argument("--batch", type=int, default=64, help="queries per call in the throughput test")
    parser.add_argument("--calls", type=int, default=200, help="timed calls of one query")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.encoder_config is None:
        from router_model.tokens import minilm_dir

        args.encoder_config = minilm_dir() / "config.json"
    vocab = json.loads(args.encoder_config.read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="mose-router-gpu-") as scratch:
        graphs = export_graphs(args.encoder_config, args.layers, Path(scratch))
        results = measure(graphs, vocab, args.batch, args.calls)
    from benchmarks._report import print_table, write_json

    print_table(
        f"Router graph (MiniLM architecture, {args.layers} layers, random weights), {QUERY_TOKENS}-token "
        f"queries, {os.cpu_count()} CPU cores",
        [
            (
                f"{r['graph']} on {r['provider']}",
                f"p50 {r['p50_ms']:.2f} ms (p95 {r['p95_ms']:.2f})",
                f"{r['batch_queries_s']:,.0f} queries/s in batches of {args.batch}",
            )
            for r in results
        ],
    )
    write_json(args.json, {"results": results, "layers": args.layers, "batch": args.batch, "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
