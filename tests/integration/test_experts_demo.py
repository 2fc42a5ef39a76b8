"""`mose demo build` on a small subset: real fine-tunes on shaped rows, results under MOSE_HOME (the
checkout untouched), held-out curves, a second run a no-op; and the greedy answers of a trained
expert are no more degenerate than the base model's on the same held-out questions."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _small_config(shared_data, verticals, tokens):
    from experts.demo import DemoConfig, profile_finetune

    settings = profile_finetune("start").model_copy(update={"train_tokens": tokens, "curve_points": 3})
    return DemoConfig(data_dir=shared_data, verticals=verticals, finetune=settings, eval_rows=24)


CHAT_TOKENS = 6000
"""Training tokens per vertical of the module's demo build (the README examples need on-topic answers)."""


@pytest.fixture(scope="module")
def chat_build(base_models, shared_data, on_idle_cores, tmp_path_factory):
    """(home, config, report, checkout status before): real medicine and math demo experts built once
    for the module, whose models then run on every idle core; the checkout's status is read before
    building."""
    from experts.demo import build_demo
    from registry.home import MoseHome

    home = MoseHome.from_env(tmp_path_factory.mktemp("chat") / "home")
    config = _small_config(shared_data, ["medicine", "math"], tokens=CHAT_TOKENS)
    tracked = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    return home, config, build_demo(home, config, progress=False), tracked


def test_demo_build_small_subset_then_noop(chat_build, shared_data, tmp_path):
    from experts.demo import build_demo, load_report, render_docs
    from registry import Registry

    home, config, report, tracked = chat_build
    assert report.built == ["demo-medicine", "demo-math"] and not report.already_built
    assert report.wins == {"medicine": True, "math": True}
    seed = report.seed
    assert seed is not None and report.seed_share == config.seed_share and report.seed_holds_lr
    for result in report.experts.values():
        # base model, the shared seed, then the expert's own training from it
        assert result.heldout_rows == 24 and len(result.curve) >= 3 and result.curve[0][1] == 0
        assert result.curve[-1][2] == result.heldout_loss and result.curve[0][2] == result.base_heldout_loss
        assert result.curve[1][:2] == (seed.steps, seed.train_tokens) and result.curve[1][2] == result.seed_heldout_loss
        assert result.curve[-1][1] == seed.train_tokens + result.train_tokens
    own = sum(r.train_tokens for r in report.experts.values())
    assert 2 * CHAT_TOKENS <= seed.train_tokens + own < 2 * (CHAT_TOKENS + 128)  # each vertical's budget, split
    assert own < seed.train_tokens  # the seed takes the larger share
    assert load_report(home) == report
    assert (
        subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout == tracked
    )  # building writes nothing into the checkout
    page = render_docs(report, config)
    assert "| math | 24 |" in page and "## Learning curves" in page and "### Sources and licences" in page
    extra, out = tmp_path / "extra.md", tmp_path / "experts.md"
    extra.write_text("## Against one generalist\n\nA table.\n")
    docs = subprocess.run(
        [
            str(REPO / ".venv/bin/mose"),
            "demo",
            "docs",
            "--home",
            str(home.root),
            "--out",
            str(out),
            "--append",
            str(extra),
            "--data",
            str(shared_data),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert docs.returncode == 0, docs.stderr
    written = out.read_text()
    assert "| math | 24 |" in written and written.index("## Against one generalist") < written.index("## Data")

    with Registry.open(home) as registry:
        records = {r.name: r for r in registry.list(status="active")}
        assert set(records) == {"demo-medicine", "demo-math"}
        metrics = records["demo-math"].manifest.metrics
        assert metrics["heldout_loss"] == report.experts["math"].heldout_loss
        assert metrics["base_heldout_loss"] == report.experts["math"].base_heldout_loss
        assert len(records["demo-medicine"].manifest.example_queries) >= 20

    started = time.perf_counter()
    again = build_demo(home, config, progress=False)
    assert again.already_built and again.built == [] and again.experts == report.experts
    assert time.perf_counter() - started < 10


README_CHAT = {"What causes high blood pressure?": "demo-medicine", "Solve 2x + 3 = 11": "demo-math"}
"""The README's chat examples and the expert the router sends each to."""


@pytest.fixture(scope="module")
def chat_pool(chat_build):
    """A pool with the module's real medicine and math demo experts."""
    from experts.pool import ExpertPool
    from registry import Registry

    home = chat_build[0]
    with Registry.open(home) as registry:
        return ExpertPool.from_registry(registry, home=home)


def _answers(pool, questions_and_experts, max_new_tokens=64):
    requests = [
        {"expert": e, "messages": [{"role": "user", "content": q}], "params": {"max_new_tokens": max_new_tokens}}
        for q, e in questions_and_experts
    ]
    return [r.text for r in pool.generate(requests)]


def test_readme_chat_examples_get_on_topic_answers(chat_pool):
    """Each README chat question, answered by its expert: not empty, not an echo, no loop, and about
    the question (MiniLM similarity to it above 0.3)."""
    from experts.sft_data import degenerate
    from router_model.embedder import MiniLMEmbedder

    answers = _answers(chat_pool, README_CHAT.items())
    embed = MiniLMEmbedder()
    for (question, expert), answer in zip(README_CHAT.items(), answers):
        assert degenerate(question, answer) is None, (expert, answer)
        q, a = embed([question, answer])
        assert float(q @ a) > 0.3, (expert, answer)


@pytest.fixture(scope="module")
def medicine_reasons(chat_pool, shared_data):
    """Why each greedy answer of the medicine expert and of the base model to 20 held-out medicine
    questions is degenerate (None when it is not), and the degenerate answers."""
    from experts.demo import load_vertical
    from experts.sft_data import degenerate

    questions = [p.question for p in load_vertical(shared_data, "medicine").heldout[:20]]
    jobs = [(q, e) for q in questions for e in ("demo-medicine", "base")]
    reasons: dict[str, list] = {"demo-medicine": [], "base": []}
    bad = []
    for (question, expert), answer in zip(jobs, _answers(chat_pool, jobs, max_new_tokens=48)):
        why = degenerate(question, answer)
        reasons[expert].append(why)
        if why:
            bad.append((expert, why, answer))
    return reasons, bad


def _no_more_degenerate_than_base(medicine_reasons, why: str) -> None:
    reasons, bad = medicine_reasons
    expert_rate = reasons["demo-medicine"].count(why) / len(reasons["base"])
    assert expert_rate <= reasons["base"].count(why) / len(reasons["base"]), bad
    assert expert_rate < 0.05, bad


@pytest.mark.parametrize("why", ["echo", "empty"])
def test_trained_expert_echoes_and_goes_empty_no_more_than_base(medicine_reasons, why):
    """Greedy answers of a real demo expert on its held-out questions (with the default echo
    guard): echoed questions and empty answers each at most the base model's rate, and under 5 %."""
    _no_more_degenerate_than_base(medicine_reasons, why)


def test_trained_expert_loops_no_more_than_base(medicine_reasons):
    """Repetition loops in the same greedy answers (with the default repetition penalty): at most the
    base model's rate, and under 5 %."""
    _no_more_degenerate_than_base(medicine_reasons, "loop")


def test_demo_build_names_missing_data(tmp_path):
    out = subprocess.run(
        [
            str(REPO / ".venv/bin/mose"),
            "demo",
            "build",
            "--data",
            str(tmp_path / "nowhere"),
            "--home",
            str(tmp_path / "home"),
        ],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert f"demo data {tmp_path / 'nowhere' / 'sft' / 'medicine.jsonl'} not found" in out.stderr
    assert "--data DIR" in out.stderr
