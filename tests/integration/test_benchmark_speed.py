"""benchmarks/decode.py and benchmarks/serve.py on tiny runs: every row of their tables and every key
the docs quote (no timing assertions: the figures are the benchmarks' business, not CI's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_decode_benchmark_tiny_run(base_models, tmp_path):
    out = tmp_path / "decode.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "decode.py"),
            "--adapters",
            "2",
            "--new-tokens",
            "3",
            "--concurrency",
            "1,2",
            "--min-requests",
            "2",
            "--no-llama",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for row in (
        "| compute bound",
        "| engine, 1 client, mixed adapters",
        "| engine, 2 clients, one adapter",
        "| engine, 2 clients, TTFT p50 / p99",
        "| engine, 2 clients, ITL p50 / p99",
        "| HF generate, batch 2, mixed adapters",
        "| llama.cpp, 1 client, base GGUF",
    ):
        assert row in run.stdout, run.stdout
    result = json.loads(out.read_text())
    assert result["bound_tps"] > 0 and result["matmul_gflops"] > 0 and result["parameters"] > 100e6
    for series in ("engine_mixed", "engine_single", "hf_mixed", "hf_single"):
        assert set(result[series]) == {"1", "2"}
        for figures in result[series].values():
            assert figures["tokens"] > 0 and figures["tps"] > 0
    mixed = result["engine_mixed"]["2"]
    assert mixed["requests"] == 4 and "penalty_vs_single" in mixed
    assert set(mixed["ttft_s"]) == set(mixed["itl_s"]) == {"p50", "p99"}
    assert result["llama_cpp"] == "skipped (--no-llama)"


def test_serve_benchmark_tiny_run(serve_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(serve_home, home)
    out = tmp_path / "serve.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serve.py"),
            "--home",
            str(home),
            "--requests",
            "2",
            "--clients",
            "1,2",
            "--max-tokens",
            "4",
            "--no-restart",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for row in (
        "| overhead ratio b/a (p50)",
        "| throughput, 1 client, mixed experts",
        "| throughput, 2 clients, streaming + non-streaming 1:1",
        "| TTFT / ITL p50, 2 clients, streamed",
        "| throughput, 2 clients, one expert",
        "| RSS of the application",
    ):
        assert row in run.stdout, run.stdout
    result = json.loads(out.read_text())
    assert result["clients"] == [1, 2] and result["max_tokens"] == 4
    for level in ("1", "2"):
        plain, mixed = result["series"][level]["non_streaming"], result["series"][level]["mixed_1_1"]
        assert plain["tokens"] > 0 and mixed["tokens"] > 0
        assert mixed["share_of_non_streaming"] > 0
        assert set(mixed["ttft_s"]) == {"p50", "p99"}  # the streamed half came back in chunks
    assert result["series"]["2"]["mixed_1_1"]["requests"] == 4
    assert "one_expert_penalty" in result and result["first_answer_s"]["restart"] is None
