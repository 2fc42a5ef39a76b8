"""Fine-tuning on real data with the real SmolLM2: lowers held-out loss, reproducible, registrable."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from experts.finetune import FinetuneConfig, load_base_for_training, load_pairs, train_lora

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def math_subset(shared_data, tmp_path):
    """A fixed, small subset of the GSM8K vertical (first 60 rows)."""
    lines = (shared_data / "sft" / "math.jsonl").read_text().splitlines()[:60]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_finetune_lowers_heldout_loss_and_registers(base_models, math_subset, router_home_copy, tmp_path):
    """--register activates the way `mose expert activate` does: here the router knows math already."""
    from registry import Registry
    from registry.home import MoseHome

    home = router_home_copy.root
    cmd = [
        str(REPO / ".venv/bin/mose"),
        "expert",
        "finetune",
        "--data",
        str(math_subset),
        "--domain",
        "math",
        "--name",
        "tiny-math",
        "--steps",
        "6",
        "--heldout",
        "6",
        "--max-tokens",
        "48",
        "--lr",
        "0.002",
        "--register",
        "--json",
        "--home",
        str(home),
    ]
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["heldout_loss"] < result["base_heldout_loss"], result
    assert result["registered"] == "tiny-math@0.1.0" and result["heldout_rows"] == 6
    assert result["router"]["version"] == "v0001" and result["router"]["added_domains"] == []
    out_dir = Path(result["out_dir"])
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.yaml",
    ]
    registry = Registry.open(MoseHome.from_env(home))
    try:
        record = registry.get("tiny-math")
        assert record.status == "active" and record.domains == ["math"] and record.kind == "lora"
        manifest = record.manifest
        assert len(manifest.example_queries) >= 20
        assert manifest.metrics["heldout_loss"] == pytest.approx(result["heldout_loss"], abs=1e-3)
        assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
    finally:
        registry.close()


def test_unknown_domain_is_refused_before_training(base_models, math_subset, tmp_path):
    cmd = [
        str(REPO / ".venv/bin/mose"),
        "expert",
        "finetune",
        "--data",
        str(math_subset),
        "--domain",
        "astrology",
        "--name",
        "x-astro",
        "--register",
        "--home",
        str(tmp_path / "home"),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "astrology" in out.stderr and "math" in out.stderr  # names the known domains
    assert not (tmp_path / "home" / "finetuned").exists()


def test_training_is_seeded_and_reproducible(base_models, math_subset):
    import torch

    pairs = load_pairs(math_subset)[:16]
    config = FinetuneConfig(steps=2, batch_size=2, max_tokens=32, top_layers=2, seed=5)
    states = []
    for _ in range(2):
        model, tokenizer = load_base_for_training()
        _, adapter = train_lora(model, tokenizer, pairs, config, progress=False)
        states.append(adapter.state_dict)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(k.endswith("lora_B.weight") and states[0][k].abs().sum() > 0 for k in states[0])
