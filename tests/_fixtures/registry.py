"""Shared pytest fixtures for the registry tests, and builders other areas can reuse.

:func:`build_lora_expert` writes a small but real peft-format LoRA expert for SmolLM2-135M
(``adapter_config.json`` + ``adapter_model.safetensors`` from random tensors) with a manifest
that passes validation. :func:`registry_state` snapshots what a failed operation must not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_ID = "smollm2-135m-instruct"  # same value as experts.base_models.SMOLLM2_ID
SMOLLM2_HIDDEN = 576
SMOLLM2_KV_DIM = 192  # 3 key/value heads x 64

DOMAIN_QUERIES = {
    "law": [
        "What is the difference between a contract and an agreement?",
        "Can a landlord keep my deposit for normal wear and tear?",
        "How long does copyright last after the author's death?",
        "What does 'consideration' mean in contract law?",
        "Is a verbal agreement legally binding?",
        "What is the statute of limitations for breach of contract?",
        "Can I be fired for refusing to work overtime?",
        "What is the difference between a felony and a misdemeanor?",
        "How does adverse possession work?",
        "What rights does a tenant have during an eviction?",
        "What makes a will legally valid?",
        "What is strict liability in tort law?",
        "Can evidence obtained without a warrant be used in court?",
        "What is the role of a grand jury?",
        "How do I trademark a business name?",
        "What is a non-compete clause and is it enforceable?",
        "What does 'beyond a reasonable doubt' mean?",
        "What is the doctrine of precedent?",
        "How does joint custody work after a divorce?",
        "What is the difference between libel and slander?",
        "When is a contract void for illegality?",
        "What is an easement on a property?",
    ],
}


@dataclass(frozen=True)
class ExpertDir:
    """A built expert folder."""

    root: Path
    manifest_path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.manifest['name']}@{self.manifest['version']}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lora_tensors(layers: int = 2, rank: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """LoRA A/B matrices for q_proj and v_proj of the first ``layers`` SmolLM2 layers (peft key names)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module, out_dim in (("q_proj", SMOLLM2_HIDDEN), ("v_proj", SMOLLM2_KV_DIM)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, SMOLLM2_HIDDEN), dtype=np.float32) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_dim, rank), dtype=np.float32) * 0.01
    return tensors


def adapter_config(rank: int = 8, layers: int = 2) -> dict[str, Any]:
    """A peft LoraConfig as ``save_pretrained`` writes it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": SMOLLM2_ID,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": list(range(layers)),
    }


def example_queries(domain: str, count: int = 22) -> list[str]:
    base = DOMAIN_QUERIES.get(domain) or [f"Example question {i} about {domain.replace('_', ' ')}?" for i in range(30)]
    return [base[i % len(base)] + ("" if i < len(base) else f" (variant {i})") for i in range(count)]


def build_lora_expert(
    root: Path,
    name: str = "demo-law",
    version: str = "1.0.0",
    domains: tuple[str, ...] = ("law",),
    layers: int = 2,
    rank: int = 8,
    seed: int = 0,
    queries: int = 22,
    manifest_format: str = "yaml",
    **overrides: Any,
) -> ExpertDir:
    """Write a valid LoRA expert folder (files + ``manifest.yaml``) under ``root``.

    ``layers``/``rank`` set the adapter size: 30 layers x rank 8 is about 1.8 MB, like a real
    SmolLM2 q/v adapter. ``overrides`` replace manifest fields (``None`` removes one).
    """
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps(adapter_config(rank, layers), indent=2))
    save_file(lora_tensors(layers, rank, seed), str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    files = {rel: sha256_of(root / rel) for rel in ("adapter_config.json", "adapter_model.safetensors")}
    size_mb = max(1, (root / "adapter_model.safetensors").stat().st_size // (1 << 20) + 1)
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "kind": "lora",
        "base_model": SMOLLM2_ID,
        "files": files,
        "domains": list(domains),
        "description": f"Answers {', '.join(domains)} questions (test expert).",
        "owner": "test-team",
        "license": "Apache-2.0",
        "example_queries": example_queries(domains[0], queries),
        "quantization": "none",
        "resources": {"memory_mb": size_mb},
        "metrics": {"heldout_loss": 1.5},
    }
    for key, value in overrides.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    manifest_path = root / f"manifest.{manifest_format}"
    write_manifest(manifest_path, manifest)
    return ExpertDir(root, manifest_path, manifest)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(manifest, indent=2))
    else:
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def registry_state(reg) -> dict[str, Any]:
    """What a refused operation must leave unchanged: records, audit chain, blobs, temp files."""
    report = reg.audit_verify()
    tmp = reg.artifacts.tmp_root
    return {
        "experts": [(r.ref, r.status) for r in reg.list()],
        "audit_ok": report.ok,
        "audit_entries": report.entries,
        "blobs": sorted(reg.artifacts.blobs()),
        "tmp_files": sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else [],
    }


def run_mose(
    *args: str, home: Path | None = None, env: dict[str, str] | None = None, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the real CLI (``python -m serve.cli``) in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    if home is not None:
        full_env["MOSE_HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mose {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def register_many(home: str, expert_dirs: list[str], go_file: str | None = None) -> None:
    """Worker for concurrency tests and benchmarks: register each folder's manifest, one by one."""
    import time

    from registry import Registry

    with Registry.open(home) as reg:
        if go_file:  # report ready, then start together: maximum contention
            Path(f"{go_file}.ready.{os.getpid()}").touch()
            while not Path(go_file).exists():
                time.sleep(0.005)
        for folder in expert_dirs:
            reg.add(Path(folder) / "manifest.yaml", actor=f"worker-{os.getpid()}")


@pytest.fixture
def registry(mose_home):
    """An open, empty :class:`registry.Registry` on a fresh home."""
    from registry import Registry

    reg = Registry.open(mose_home)
    yield reg
    reg.close()


@pytest.fixture
def lora_expert(tmp_path) -> ExpertDir:
    """A valid small LoRA expert folder (``demo-law@1.0.0``, domain ``law``)."""
    return build_lora_expert(tmp_path / "demo-law")


def assert_refused(reg, call, error_type: type[Exception], message: str) -> None:
    """``call()`` raises ``error_type`` with exactly ``message``, and the registry is unchanged."""
    before = registry_state(reg)
    assert before["audit_ok"], "registry was already broken before the call"
    with pytest.raises(error_type) as caught:
        call()
    assert str(caught.value) == message
    assert registry_state(reg) == before


@pytest.fixture
def seeded_registry(registry, tmp_path):
    """A registry holding one active expert (``seed-law@1.0.0``), so 'unchanged' means something."""
    seed = build_lora_expert(tmp_path / "seed", name="seed-law", seed=99)
    registry.add(seed.manifest_path)
    registry.activate("seed-law")
    return registry
