"""`mose demo build` on a small subset: registers active experts, writes the matrix, second run no-op."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_build_small_subset_then_noop(base_models, shared_data, tmp_path):
    from experts.demo import DemoConfig, build_demo
    from experts.finetune import FinetuneConfig
    from registry import Registry
    from registry.home import MoseHome

    home = MoseHome.from_env(tmp_path / "home")
    docs = tmp_path / "experts.md"
    config = DemoConfig(data_dir=shared_data, verticals=["math", "code"], docs_path=docs,
                        finetune=FinetuneConfig(steps=4, batch_size=4, learning_rate=3e-3, max_tokens=48,
                                                heldout_rows=4, top_layers=6))
    report = build_demo(home, config, progress=False)
    assert report.built == ["demo-math", "demo-code"] and not report.already_built
    assert set(report.matrix) == {"demo-math", "demo-code", "base"}
    assert all(set(row) == {"math", "code"} for row in report.matrix.values())
    assert report.wins == {"math": True, "code": True}
    page = docs.read_text()
    assert "| demo-math | **" in page and "### Sources and licences" in page and "GSM8K" in page

    registry = Registry.open(home)
    try:
        records = {r.name: r for r in registry.list(status="active")}
        assert set(records) == {"demo-math", "demo-code"}
        math_metrics = records["demo-math"].manifest.metrics
        assert math_metrics["heldout_loss"] == report.matrix["demo-math"]["math"]
        assert math_metrics["base_heldout_loss"] == report.matrix["base"]["math"]
        assert len(records["demo-code"].manifest.example_queries) >= 20
    finally:
        registry.close()

    started = time.perf_counter()
    again = build_demo(home, config, progress=False)
    assert again.already_built and again.built == [] and again.matrix == report.matrix
    assert time.perf_counter() - started < 10


def test_demo_build_names_missing_data(tmp_path):
    out = subprocess.run([str(REPO / ".venv/bin/mose"), "demo", "build", "--data", str(tmp_path / "nowhere"),
                          "--home", str(tmp_path / "home"), "--no-docs"],
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"demo data {tmp_path / 'nowhere' / 'sft' / 'medicine.jsonl'} not found" in out.stderr
    assert "--data DIR" in out.stderr
