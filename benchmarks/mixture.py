"""The mixture against the monolith: do routed specialists answer better than one generalist?

    .venv/bin/python benchmarks/mixture.py --home .mose          # after `make start`
    .venv/bin/python benchmarks/mixture.py --home .mose --json out.json

On the held-out rows of every demo vertical (the first ``--rows`` by question hash, never
trained on), in one run and on the same rows for every system:

* ``base``: SmolLM2-135M-Instruct alone;
* ``generalist``: the experts' recipe without the split: the same shared seed adapter, continued
  on the nine experts' own rows together (shuffled) with the experts' settings, so it sees exactly
  the rows and tokens the experts saw, under the same learning-rate schedule;
* ``one_run_generalist``: one LoRA of the same shape trained on the same rows in one run from the
  base model, its learning rate warming up and decaying once;
* ``oracle``: each question answered by its own vertical's expert;
* ``auto``: each question answered by the expert the shipped router picks (the base model where
  it abstains);
* ``top2``: the next-token distributions of the router's two most probable experts mixed by
  their router probabilities (renormalised) at every answer token, the c-BTM way of using two
  experts for one answer (``auto`` where the router abstains or its second domain has no other
  expert). Answer NLL only: the pool decodes one expert per row, so ``top2`` has no greedy
  answers or option picks.

Metrics per vertical and overall: answer NLL per token, teacher-forced on the reference answer;
on the first ``--gen-rows`` rows, the greedy answer's MiniLM cosine similarity to the reference,
its degenerate rate (empty, echoed question, repetition loop: :func:`experts.sft_data.degenerate`)
and, for math, whether its final number is the reference's; on ``--option-questions``
multiple-choice questions per vertical (crosscheck_dev's ``mmlu_mc`` rows grouped by question: the
right option and a distractor, questions of the experts' fine-tuning data left out), whether the
system finds the right option likelier (mean answer-token log-prob) than the wrong one, chance
being 50 %. Printed beside them: 95 %
bootstrap intervals for ``auto`` minus each generalist and ``top2`` minus ``auto`` NLL and the
router's share of questions per vertical. The generalists are cached under ``MOSE_HOME/benchmarks/``
(keyed by their training settings and rows), so a second run only measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SYSTEMS = ("base", "one_run_generalist", "generalist", "oracle", "auto")
"""Systems that answer with one expert per question (NLL, greedy answers and option picks)."""
MIXED = "top2"
"""The per-token mixture of the router's two likeliest experts (NLL only)."""
GENERALISTS = {"generalist": "mixture-generalist", "one_run_generalist": "mixture-one-run-generalist"}
"""System -> the name its adapter is served under in the benchmark's pool."""
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the generalist


def generalist_rows(data: dict, settings, tokenizer) -> list:
    """The rows the nine experts trained on, together (each vertical's leading rows within the
    token budget, as :func:`experts.finetune.train_lora` takes them), shuffled."""
    from experts.chat import encode_pair

    rows = []
    for vd in data.values():
        used = 0
        for pair in vd.train:
            if settings.train_tokens is not None and used >= settings.train_tokens:
                break
            rows.append(pair)
            used += len(encode_pair(tokenizer, pair.question, pair.answer, settings.max_tokens).input_ids)
    random.Random(settings.seed + 7).shuffle(rows)
    return rows


def train_generalist(home, data: dict, settings, progress: bool):
    """(lora_config, state_dict, run) of the one-run generalist: every row the experts trained on,
    shuffled, in one run from the base model with the experts' settings."""
    from transformers import AutoTokenizer

    from experts.base_models import SMOLLM2_ID, ensure_base_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_base_model(SMOLLM2_ID, home), local_files_only=True)
    rows = generalist_rows(data, settings, tokenizer)
    run = settings.model_copy(update={"train_tokens": None, "curve_points": 2})
    return cached_lora(home, "one-run-generalist", rows, run, None, progress)


def train_seeded_generalist(home, config, data: dict, report, progress: bool):
    """(lora_config, state_dict, run) of the generalist trained by the experts' own recipe: the
    build's shared seed (``MOSE_HOME/demo/seed``), continued on the nine verticals' own rows
    together with the experts' settings (from the base model when the build had no seed)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from experts.base_models import SMOLLM2_ID, ensure_base_model
    from experts.demo import seed_and_own_rows

    tokenizer = AutoTokenizer.from_pretrained(ensure_base_model(SMOLLM2_ID, home), local_files_only=True)
    _, own = seed_and_own_rows(config, data, tokenizer)
    seed_state = None
    if report.seed is not None:
        seed_state = load_file(str(home.root / "demo" / "seed" / "adapter_model.safetensors"))
    rows = [pair for vertical in config.verticals for pair in own[vertical]]
    random.Random(config.settings.seed + 7).shuffle(rows)
    branch = config.settings.model_copy(
        update={
            "train_tokens": None,
            "max_train_rows": None,
            "curve_points": 2,
            "learning_rate": report.branch_learning_rate or config.settings.learning_rate,
        }
    )
    lora_config, state, run = cached_lora(home, "generalist", rows, branch, seed_state, progress)
    seed_tokens = report.seed.train_tokens if report.seed else 0
    return lora_config, state, {**run, "train_tokens": run["train_tokens"] + seed_tokens, "seed_tokens": seed_tokens}


def cached_lora(home, name: str, rows: list, settings, init_state: dict | None, progress: bool):
    """(lora_config, state_dict, run) of a LoRA trained on ``rows`` (from ``init_state`` when
    given), cached under ``MOSE_HOME/benchmarks/`` by its settings, rows and starting point."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from experts.finetune import load_base_for_training, train_lora

    digest = hashlib.sha256((settings.model_dump_json() + "".join(p.question + p.answer for p in rows)).encode())
    for key in sorted(init_state or {}):
        digest.update(key.encode() + init_state[key].float().numpy().tobytes())
    folder = home.root / "benchmarks" / f"{name}-{digest.hexdigest()[:16]}"
    if (folder / "adapter_model.safetensors").is_file():
        config = LoraConfig(**json.loads((folder / "adapter_config.json").read_text()))
        run = json.loads((folder / "run.json").read_text())
        return config, load_file(str(folder / "adapter_model.safetensors")), run
    log(f"training the {name} on {len(rows)} rows")
    model, tokenizer = load_base_for_training(home)
    _, adapter = train_lora(model, tokenizer, rows, settings, progress, label=name, init_state=init_state)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter.lora_config.to_dict().items()}
    (folder / "adapter_config.json").write_text(json.dumps(config, default=str))
    save_file({k: v.contiguous() for k, v in adapter.state_dict.items()}, str(folder / "adapter_model.safetensors"))
    run = {
        "rows": len(rows),
        "train_tokens": adapter.train_tokens,
        "steps": len(adapter.train_losses),
        "seconds": round(adapter.seconds, 1),
    }
    (folder / "run.json").write_text(json.dumps(run))
    del model
    torch.set_grad_enabled(True)
    return adapter.lora_config, adapter.state_dict, run


# ---------------------------------------------------------------- measuring


def final_number(text: str) -> str | None:
    """The last number in ``text`` (commas dropped), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def expert_of(system: str, vertical: str, routed: str) -> str:
    """The expert that answers a question of ``vertical`` for ``system`` (``routed``: the router's
    servable pick, or the base model)."""
    from experts.demo import demo_name

    return {"base": "base", **GENERALISTS, "oracle": demo_name(vertical), "auto": routed}[system]


def top_two(decision, served: set[str], fallback: str) -> list[tuple[str, float]]:
    """(expert, weight) of the router's two most probable servable experts, weights renormalised
    to sum to one; ``[(fallback, 1.0)]`` when the router abstained or has one expert to offer."""
    picked: dict[str, float] = {}
    if not decision.abstained:
        for alternative in decision.top_k:
            if alternative.expert in served and alternative.expert not in picked and len(picked) < 2:
                picked[alternative.expert] = alternative.p
    total = sum(picked.values())
    if len(picked) < 2 or total <= 0:
        return [(fallback, 1.0)]
    return [(expert, p / total) for expert, p in picked.items()]


def mixed_nll(token_logprobs: list[list[float]], weights: list[float]) -> tuple[float, int]:
    """(summed NLL, tokens) of one answer under a per-token mixture: at each token,
    -log sum_j w_j p_j(token), from each expert's log-prob of the same answer tokens."""
    import math

    total = 0.0
    for per_expert in zip(*token_logprobs):
        top = max(per_expert)
        total -= top + math.log(sum(w * math.exp(lp - top) for w, lp in zip(weights, per_expert)))
    return total, len(token_logprobs[0])


def option_questions(data_dir: Path, verticals: list[str], per_vertical: int, seen: set[str]) -> list[tuple]:
    """(vertical, question, [(option, is right)]) for up to ``per_vertical`` multiple-choice
    questions per vertical from crosscheck_dev's ``mmlu_mc`` rows (one right option, at least one
    distractor), first by question hash; a question in ``seen`` (the experts' data) is left out."""
    path = Path(data_dir) / "crosscheck_dev.jsonl"
    if per_vertical <= 0 or not path.is_file():
        return []
    grouped: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    with path.open(encoding="utf-8") as lines:  # not splitlines(): answers hold U+2028 and the like
        rows = [json.loads(line) for line in lines if line.strip()]
    for row in rows:
        if row.get("source") == "mmlu_mc" and row.get("domain") in verticals and row["question"].strip() not in seen:
            grouped.setdefault((row["domain"], row["question"]), []).append((row["answer"], row["label"] == 1))
    usable = sorted(
        ((v, q, opts) for (v, q), opts in grouped.items() if sum(right for _, right in opts) == 1 and len(opts) >= 2),
        key=lambda item: hashlib.sha256(item[1].encode()).hexdigest(),
    )
    out = []
    for vertical in verticals:
        out += [item for item in usable if item[0] == vertical][:per_vertical]
    return out


def bootstrap_difference(
    a: list[tuple[float, int]], b: list[tuple[float, int]], samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Token-weighted mean NLL of ``a`` minus ``b`` on the same rows: (estimate, 2.5 %, 97.5 %)."""
    import numpy as np

    nll_a, tok_a = np.array([n for n, _ in a]), np.array([c for _, c in a])
    nll_b, tok_b = np.array([n for n, _ in b]), np.array([c for _, c in b])
    estimate = nll_a.sum() / tok_a.sum() - nll_b.sum() / tok_b.sum()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(samples, len(a)))
    diffs = nll_a[picks].sum(1) / tok_a[picks].sum(1) - nll_b[picks].sum(1) / tok_b[picks].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(estimate), float(low), float(high)


def run(args: argparse.Namespace) -> dict:
    from experts.demo import DemoConfig, demo_name, load_report, load_vertical
    from experts.pool import ExpertPool
    from experts.sft_data import degenerate
    from registry import Registry
    from registry.home import MoseHome
    from router_model.embedder import MiniLMEmbedder
    from router_model.runtime import load_router

    started = time.perf_counter()
    home = MoseHome.from_env(args.home)
    report = load_report(home)
    if report is None:
        raise SystemExit(f"no demo build in {home.root}: run `mose up --prepare-only` (or `mose demo build`) first")
    verticals = [v for v in (args.verticals.split(",") if args.verticals else report.experts) if v]
    built_with = report.settings or DemoConfig(profile=report.profile).settings  # the experts' own budget
    settings = (
        built_with if args.train_tokens is None else built_with.model_copy(update={"train_tokens": args.train_tokens})
    )
    config = DemoConfig(
        data_dir=args.data or DemoConfig().data_dir,
        profile=report.profile,
        verticals=verticals,
        finetune=settings,
        seed_share=report.seed_share,
    )
    data = {v: load_vertical(config.data_dir, v, config.heldout_fraction, settings.seed) for v in verticals}

    options = option_questions(
        config.data_dir,
        verticals,
        args.option_questions,
        {p.question.strip() for v in verticals for p in data[v].train + data[v].heldout},
    )
    systems = tuple(s for s in SYSTEMS if not (args.no_one_run_generalist and s == "one_run_generalist"))
    trained = {"generalist": train_seeded_generalist(home, config, data, report, progress=not args.quiet)}
    if "one_run_generalist" in systems:
        trained["one_run_generalist"] = train_generalist(home, data, settings, progress=not args.quiet)
    with Registry.open(home) as registry:
        pool = ExpertPool(home=home)
        for vertical in verticals:
            pool.add_registered(registry, registry.active(demo_name(vertical)))
        for system, (lora_config, state, _) in trained.items():
            pool.add_adapter(GENERALISTS[system], lora_config, state)
        router = load_router(home, registry)
        rows = [(v, p) for v in verticals for p in data[v].heldout[: args.rows]]
        decisions = router.route_batch([p.question for _, p in rows])
        option_routes = router.route_batch([q for _, q, _ in options]) if options else []
    served = set(pool.experts()) | {"base"}
    routed = [d.expert if d.expert in served else "base" for d in decisions]

    def system_expert(system: str, index: int) -> str:
        return expert_of(system, rows[index][0], routed[index])

    mixtures = [top_two(d, served, routed[i]) for i, d in enumerate(decisions)]
    log(f"teacher-forced NLL on {len(rows)} held-out rows x {len(systems) + 1} systems")
    needed = sorted(
        {system_expert(s, i) for s in systems for i in range(len(rows))} | {e for m in mixtures for e, _ in m}
    )
    pairs = [(p.question, p.answer) for _, p in rows]
    tokens = pool.answer_token_logprobs(pairs, needed, max_tokens=settings.max_tokens)
    nll = {
        s: [(-sum(tokens[system_expert(s, i)][i]), len(tokens[system_expert(s, i)][i])) for i in range(len(rows))]
        for s in systems
    }
    nll[MIXED] = [
        mixed_nll([tokens[e][i] for e, _ in mixture], [w for _, w in mixture]) for i, mixture in enumerate(mixtures)
    ]

    gen_index = [i for i, (v, _) in enumerate(rows) if data[v].heldout.index(rows[i][1]) < args.gen_rows]
    jobs = sorted({(i, system_expert(s, i)) for s in systems for i in gen_index})
    log(f"greedy answers: {len(jobs)} distinct (question, expert) pairs, up to {args.max_new_tokens} tokens")
    answers = {}
    for start in range(0, len(jobs), args.batch):
        chunk = jobs[start : start + args.batch]
        results = pool.generate(
            [
                {
                    "expert": e,
                    "messages": [{"role": "user", "content": rows[i][1].question}],
                    "params": {"max_new_tokens": args.max_new_tokens},
                }
                for i, e in chunk
            ]
        )
        answers.update({job: r.text for job, r in zip(chunk, results)})
        log(f"  {min(start + args.batch, len(jobs))}/{len(jobs)}")
    option_routed = [d.expert if d.expert in served else "base" for d in option_routes]

    def option_expert(system: str, index: int) -> str:
        return expert_of(system, options[index][0], option_routed[index])

    # each question's options scored only under the experts its systems use
    by_option_expert: dict[str, list[int]] = {}
    for i in range(len(options)):
        for expert in {option_expert(s, i) for s in systems}:
            by_option_expert.setdefault(expert, []).append(i)
    log(f"multiple-choice options: {len(options)} questions under {len(by_option_expert)} experts")
    option_nll: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for expert, indices in sorted(by_option_expert.items()):
        pairs_of = [(options[i][1], text) for i in indices for text, _ in options[i][2]]
        scored = pool.answer_nll_rows(pairs_of, [expert], max_tokens=settings.max_tokens)[expert]
        for i in indices:
            option_nll[(expert, i)], scored = scored[: len(options[i][2])], scored[len(options[i][2]) :]

    def option_right(system: str, index: int) -> bool:
        """Whether ``system`` finds the right option of question ``index`` likeliest."""
        scored = option_nll[(option_expert(system, index), index)]
        best = min(range(len(scored)), key=lambda j: scored[j][0] / max(1, scored[j][1]))
        return options[index][2][best][1]

    def option_metrics(system: str, vertical: str) -> dict:
        picked = [i for i, (v, _, _) in enumerate(options) if vertical in (v, "overall")]
        if not picked:
            return {}
        return {
            "mmlu_option": sum(option_right(system, i) for i in picked) / len(picked),
            "mmlu_option_questions": len(picked),
        }

    embed = MiniLMEmbedder()
    texts = sorted(set(answers.values()) | {rows[i][1].answer for i in gen_index})
    vectors = dict(zip(texts, embed(texts)))

    def gen_metrics(system: str, indices: list[int]) -> dict:
        picked = [i for i in indices if i in set(gen_index)]
        if not picked:
            return {}
        outs = [(i, answers[(i, system_expert(system, i))]) for i in picked]
        sims = [float(vectors[text] @ vectors[rows[i][1].answer]) for i, text in outs]
        reasons = [degenerate(rows[i][1].question, text) for i, text in outs]
        metrics = {
            "similarity": sum(sims) / len(sims),
            "degenerate": sum(r is not None for r in reasons) / len(outs),
            "echo": reasons.count("echo") / len(outs),
            "empty": reasons.count("empty") / len(outs),
            "loop": reasons.count("loop") / len(outs),
            "answers": len(outs),
        }
        numeric = [
            (text, rows[i][1].answer)
            for i, text in outs
            if rows[i][0] == "math" and final_number(rows[i][1].answer) is not None
        ]
        if numeric:
            metrics["math_final_number"] = sum(final_number(t) == final_number(r) for t, r in numeric) / len(numeric)
        return metrics

    def nll_of(system: str, indices: list[int]) -> float:
        picked = [nll[system][i] for i in indices]
        return sum(n for n, _ in picked) / max(1, sum(c for _, c in picked))

    per_vertical = {}
    for vertical in verticals + ["overall"]:
        indices = [i for i, (v, _) in enumerate(rows) if vertical in (v, "overall")]
        per_vertical[vertical] = {
            s: {"nll": nll_of(s, indices), **gen_metrics(s, indices), **option_metrics(s, vertical)} for s in systems
        }
        per_vertical[vertical][MIXED] = {"nll": nll_of(MIXED, indices)}
        per_vertical[vertical]["rows"] = len(indices)
        shares: dict[str, int] = {}
        for i in indices:
            shares[routed[i]] = shares.get(routed[i], 0) + 1
        per_vertical[vertical]["routing"] = {k: v / len(indices) for k, v in sorted(shares.items())}
        per_vertical[vertical]["routed_to_own"] = sum(routed[i] == demo_name(rows[i][0]) for i in indices) / len(
            indices
        )
    auto_minus_generalist = bootstrap_difference(nll["auto"], nll["generalist"])
    auto_minus_one_run = (
        bootstrap_difference(nll["auto"], nll["one_run_generalist"]) if "one_run_generalist" in nll else None
    )
    top2_minus_auto = bootstrap_difference(nll[MIXED], nll["auto"])
    mixed_rows = sum(len(m) == 2 for m in mixtures)
    return {
        "home": str(home.root),
        "profile": report.profile,
        "verticals": verticals,
        "rows_per_vertical": args.rows,
        "gen_rows_per_vertical": args.gen_rows,
        "max_new_tokens": args.max_new_tokens,
        "generalist": trained["generalist"][2],
        "one_run_generalist": trained["one_run_generalist"][2] if "one_run_generalist" in trained else None,
        "systems": [*systems, MIXED],
        "experts_train_tokens": sum(report.experts[v].train_tokens for v in verticals if v in report.experts)
        + (report.seed.train_tokens if report.seed else 0),
        "per_vertical": per_vertical,
        "auto_minus_generalist_nll": dict(zip(("estimate", "low", "high"), auto_minus_generalist)),
        "auto_minus_one_run_generalist_nll": (
            None if auto_minus_one_run is None else dict(zip(("estimate", "low", "high"), auto_minus_one_run))
        ),
        "auto_minus_oracle_nll": nll_of("auto", list(range(len(rows)))) - nll_of("oracle", list(range(len(rows)))),
        "top2_minus_auto_nll": dict(zip(("estimate", "low", "high"), top2_minus_auto)),
        "top2_mixed_share": mixed_rows / max(1, len(rows)),
        "router": getattr(router, "version", "fallback"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(result: dict) -> str:
    """Markdown tables: NLL per vertical and system, then the greedy-answer metrics overall."""
    verticals = result["verticals"]
    systems = [s for s in result.get("systems", [*SYSTEMS, MIXED]) if s != MIXED]
    lines = ["| system | " + " | ".join(verticals) + " | overall |", "|---|" + "---|" * (len(verticals) + 1)]
    for system in (*systems, MIXED):
        cells = [f"{result['per_vertical'][v][system]['nll']:.3f}" for v in verticals + ["overall"]]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines.append(
        "| routed to own expert | "
        + " | ".join(f"{result['per_vertical'][v]['routed_to_own']:.0%}" for v in verticals + ["overall"])
        + " |"
    )
    lines += [
        "",
        "| system (greedy answers) | MiniLM similarity | degenerate | echo | empty | loop | math final number |",
        "|---|---|---|---|---|---|---|",
    ]
    overall = result["per_vertical"]["overall"]
    math = result["per_vertical"].get("math", {})
    for system in systems:
        m = overall[system]
        if "similarity" not in m:
            continue
        exact = math.get(system, {}).get("math_final_number")
        lines.append(
            f"| {system} | {m['similarity']:.3f} | {m['degenerate']:.1%} | {m['echo']:.1%} | "
            f"{m['empty']:.1%} | {m['loop']:.1%} | {'-' if exact is None else f'{exact:.0%}'} |"
        )
    if any("mmlu_option" in result["per_vertical"][v].get("base", {}) for v in verticals):
        counted = [v for v in verticals + ["overall"] if "mmlu_option" in result["per_vertical"][v]["base"]]
        lines += [
            "",
            "| multiple-choice: right option likelier | "
            + " | ".join(f"{v} ({result['per_vertical'][v]['base']['mmlu_option_questions']})" for v in counted)
            + " |",
            "|---|" + "---|" * len(counted),
        ]
        for system in systems:
            lines.append(
                f"| {system} | "
                + " | ".join(f"{result['per_vertical'][v][system]['mmlu_option']:.0%}" for v in counted)
                + " |"
            )
    d, o, t = (
        result[k] for k in ("auto_minus_generalist_nll", "auto_minus_one_run_generalist_nll", "top2_minus_auto_nll")
    )
    one_run = (
        "" if o is None else f"auto - one_run_generalist: {o['estimate']:+.3f} ({o['low']:+.3f} .. {o['high']:+.3f}); "
    )
    lines += [
        "",
        f"auto - generalist NLL: {d['estimate']:+.3f} (95 % bootstrap {d['low']:+.3f} .. {d['high']:+.3f}); "
        f"{one_run}auto - oracle: {result['auto_minus_oracle_nll']:+.3f}",
        f"top2 - auto NLL: {t['estimate']:+.3f} (95 % bootstrap {t['low']:+.3f} .. {t['high']:+.3f}); "
        f"two experts mixed on {result['top2_mixed_share']:.0%} of rows",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--home",
        default=os.environ.get("MOSE_HOME", str(REPO / ".mose")),
        help="data directory with the demo experts and the router (default $MOSE_HOME or .mose)",
    )
    parser.add_argument(
        "--data", default=None, help="folder holding sft/ (default $MOSE_SHARED_DATA or ../shared/data)"
    )
    parser.add_argument("--verticals", default=None, help="comma-separated subset (default: every demo expert)")
    parser.add_argument("--rows", type=int, default=64, help="held-out rows per vertical for NLL (default 64)")
    parser.add_argument("--gen-rows", type=int, default=16, help="of those, rows answered greedily (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="greedy answer length (default 96)")
    parser.add_argument(
        "--option-questions",
        type=int,
        default=24,
        help="multiple-choice questions per vertical for the option check (default 24; 0: none)",
    )
    parser.add_argument("--batch", type=int, default=16, help="generation requests per call (default 16)")
    parser.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="tokens per vertical in the generalist's data (default: the experts' budget)",
    )
    parser.add_argument(
        "--no-one-run-generalist",
        action="store_true",
        help="leave out the one-run generalist (on the full profile its training is the longest step)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
