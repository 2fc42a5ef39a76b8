"""benchmarks/mixture.py on a tiny run: real demo experts, a real router, real generalists; the table
has every system's row and the JSON every key the docs quote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mixture_benchmark_tiny_run(base_models, shared_data, router_home_copy, on_idle_cores, tmp_path):
    from experts.demo import DemoConfig, build_demo, profile_finetune

    settings = profile_finetune("start").model_copy(update={"train_tokens": 1200, "curve_points": 2})
    build_demo(
        router_home_copy,
        DemoConfig(data_dir=shared_data, verticals=["math", "code"], finetune=settings, eval_rows=4),
        progress=False,
    )
    out = tmp_path / "mixture.json"
    env = dict(os.environ, MOSE_SHARED_DATA=str(shared_data))
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "mixture.py"),
            "--home",
            str(router_home_copy.root),
            "--rows",
            "3",
            "--gen-rows",
            "2",
            "--max-new-tokens",
            "8",
            "--option-questions",
            "2",
            "--json",
            str(out),
            "--quiet",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for system in ("base", "one_run_generalist", "generalist", "oracle", "auto"):
        assert f"| {system} |" in run.stdout
    assert "auto - generalist NLL" in run.stdout and "routed to own expert" in run.stdout
    result = json.loads(out.read_text())
    assert result["verticals"] == ["math", "code"]
    for generalist in ("generalist", "one_run_generalist"):  # the same budget as the experts
        assert result[generalist]["train_tokens"] == result["experts_train_tokens"]
    assert result["generalist"]["seed_tokens"] > 0  # continued from the build's seed
    for vertical in ("math", "code", "overall"):
        row = result["per_vertical"][vertical]
        assert row["rows"] == (6 if vertical == "overall" else 3)
        for system in ("base", "one_run_generalist", "generalist", "oracle", "auto"):
            assert row[system]["nll"] > 0
            assert {"similarity", "degenerate", "echo", "empty", "loop"} <= set(row[system])
    assert "math_final_number" in result["per_vertical"]["math"]["oracle"]
    assert "multiple-choice: right option likelier" in run.stdout
    for vertical, questions in (("math", 2), ("code", 2), ("overall", 4)):
        for system in ("base", "one_run_generalist", "generalist", "oracle", "auto"):
            row = result["per_vertical"][vertical][system]
            assert row["mmlu_option_questions"] == questions and 0 <= row["mmlu_option"] <= 1
    for key in ("auto_minus_generalist_nll", "auto_minus_one_run_generalist_nll", "top2_minus_auto_nll"):
        assert result[key]["low"] <= result[key]["estimate"] <= result[key]["high"]
    assert "| top2 |" in run.stdout and "top2 - auto NLL" in run.stdout
    assert all(result["per_vertical"][v]["top2"]["nll"] > 0 for v in ("math", "code", "overall"))
    assert 0 <= result["top2_mixed_share"] <= 1
