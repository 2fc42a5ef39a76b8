"""Shared pytest fixtures for the experts tests.

Real parts only: the converted SmolLM2 from the shared cache (MOSE_CACHE, prepared once per
session), real registries on disk, real peft adapters (random but non-trivial weights, so that
different adapters really produce different tokens).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def idle_cores() -> Iterator[int]:
    """Torch threads on every core for heavy work that runs alone (training, jury scoring), while
    no other process keeps the cores busy; else one thread, the tests' default (tests/conftest.py:
    beside a busy server, two threads wait on each other). Measured here: a demo build and a
    calibrator's evidence about 1.7x faster on two threads than on one. Sets $MOSE_CPU_THREADS
    (what pools, trainers and CLI subprocesses read) and torch's count; restores both."""
    import torch

    from experts.policy import THREADS_ENV
    from router_model.train import auto_threads

    threads, env, before = auto_threads(), os.environ.get(THREADS_ENV), torch.get_num_threads()
    os.environ[THREADS_ENV] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if env is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = env
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def on_idle_cores() -> Iterator[int]:
    """:func:`idle_cores` for a whole module whose tests run no server beside them."""
    with idle_cores() as threads:
        yield threads


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def random_lora(
    seed: int,
    rank: int = 4,
    scale: float = 0.3,
    layers: range = range(30),
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
):
    """(LoraConfig, state dict) of a LoRA adapter on SmolLM2 with random A and B (B != 0)."""
    import torch
    from peft import LoraConfig

    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        for module in modules:
            out_dim, in_dim = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * scale / in_dim**0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * scale
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(modules),
        layers_to_transform=list(layers) if len(layers) < 30 else None,
        inference_mode=True,
    )
    return config, state


def flat_scores(pool, items, adapt_question=True, **config):
    """``pool.score_many`` with some pool settings changed for the call (restored after): per
    item, the flat list [with question, without question] of each expert in turn."""
    before = {name: getattr(pool.config, name) for name in config}
    for name, value in config.items():
        setattr(pool.config, name, value)
    try:
        return [
            [value for s in row for value in (s.logp_given_question, s.logp_without_question)]
            for row in pool.score_many(items, adapt_question)
        ]
    finally:
        for name, value in before.items():
            setattr(pool.config, name, value)


def write_lora_expert(folder: Path, name: str, seed: int = 0, domain: str = "law", version: str = "0.1.0") -> Path:
    """A registrable LoRA expert folder (adapter files + manifest.yaml); returns the manifest path."""
    from experts.finetune import FinetuneConfig, QAPair, TrainedAdapter, write_expert

    config, state = random_lora(seed)
    pairs = [QAPair(f"Example question number {i} about {domain}?", f"Answer {i}.") for i in range(24)]
    adapter = TrainedAdapter(lora_config=config, state_dict=state, train_losses=[], seconds=0.0)
    return write_expert(
        folder / name,
        name,
        domain,
        adapter,
        pairs,
        {"heldout_loss": 1.0},
        FinetuneConfig(),
        version=version,
        owner="tests",
    )


def write_full_expert(folder: Path, name: str, seed: int = 0, hidden: int = 32, domain: str = "science") -> Path:
    """A tiny full-weight Llama expert (SmolLM2's vocabulary, random weights) with its manifest."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from experts.base_models import sha256_file
    from registry.manifest import ExpertManifest, dump_manifest

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    out = folder / name
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.suffix in (".json", ".safetensors")}
    size_mb = max(1, (out / "model.safetensors").stat().st_size >> 20)
    manifest = ExpertManifest(
        name=name,
        version="0.1.0",
        kind="full",
        files=files,
        domains=[domain],
        description="tiny random full-weight test expert",
        owner="tests",
        license="Apache-2.0",
        example_queries=[f"query {i}" for i in range(20)],
        resources={"memory_mb": size_mb},
    )
    dump_manifest(manifest, out / "manifest.yaml")
    return out / "manifest.yaml"


@pytest.fixture(scope="session")
def base_models():
    """Base models prepared once per session into the shared cache (MOSE_CACHE)."""
    from experts.base_models import prepare_base_models
    from registry.home import MoseHome

    return prepare_base_models(MoseHome.from_env(), progress=False)


@pytest.fixture(scope="module")
def expert_pool(base_models, tmp_path_factory):
    """One real pool on SmolLM2 per test module (tests remove the experts they add)."""
    from experts.pool import ExpertPool, PoolConfig
    from registry.home import MoseHome

    home = MoseHome.from_env(tmp_path_factory.mktemp("pool-home"))
    return ExpertPool(PoolConfig(max_new_tokens_limit=64), home=home)


@pytest.fixture
def registry(mose_home):
    """A real, empty registry in a fresh data directory."""
    from registry import Registry

    reg = Registry.open(mose_home)
    yield reg
    reg.close()
