"""Cross-check jury benchmark: scoring speed, and a deliberately bad juror against reputation.

    .venv/bin/python benchmarks/jury.py speed [--home DIR] [--items 48] [--json FILE]
    .venv/bin/python benchmarks/jury.py precision [--home DIR] [--items 48] [--json FILE]
    .venv/bin/python benchmarks/jury.py reputation [--home DIR] [--feedback 30] [--heldout 40] [--json FILE]
    .venv/bin/python benchmarks/jury.py own-answers [--home DIR] [--per-source 12] [--json FILE]

``speed``: short-answer rows (mmlu_mc, truthfulqa, halueval_qa), k=3 routed experts + the base
model, evidence only (no own answers). Side by side in one run: the plain path (one full forward
pass per juror and text), ours with adapters reading the question (shared trunk + cached prompt
prefixes) and ours as by default, with answer-only adapters (the question read once, unadapted:
other evidence, as good on crosscheck_dev), at 1, 16 and 48 items per call; every path keeps the
base model's answer state for the calibrator's truthfulness probe, and the default path runs once
more without it. The pool reuses freed memory (``experts.policy.reuse_freed_memory``);
``--glibc-allocator`` runs every path without it.

``precision``: the same rows on the default path, the pool loaded in float32 and in bf16
(weights and activations; the CPU default where the CPU has AVX-512 bf16 or AMX, slow elsewhere),
side by side in one run: items/s, how far each evidence value and the base model's answer state
move, and how far the home's calibrator moves its P(correct). The precision is the pool's
``DevicePolicy.cpu_dtype`` (``MOSE_CPU_DTYPE``); ``speed`` runs in the default ('auto').

``reputation``: fine-tunes a deliberately bad adapter and seats it on every jury beside the
router's k=3 experts: ``--bad-juror shuffled`` (default) learns *shuffled* general-knowledge
fine-tuning pairs (any answer goes with any question); ``shuffled-dev`` learns the large model's
answers to train-bucket questions of crosscheck_dev dealt out among the other questions of their
source (it keeps those answers' style, right and wrong alike, and loses which answer goes with
which question); ``misled`` learns the large model's *wrong* answers to other train-bucket
questions (it comes to prefer them). Then
``--feedback`` rows per source (train bucket) get a verdict and feedback with their true label,
through ``Jury.feedback`` into a scratch registry, so reputations move as in production. Prints
each juror's weight before and after, and the calibrated jury's AUROC on ``--heldout`` rows per
source of the test bucket: without the bad juror, with it at its prior weight, and with it at
the weight feedback gave it. The pool and router come from ``--home``; nothing there changes.

``own-answers``: what the jurors' own answers would add. The router's k=3 experts and the base
model each answer every question greedily (``JuryConfig.own_answer_tokens``), on ``--per-source``
labelled test-bucket rows per source of crosscheck_dev and on the 40-question sanity suite
(``tests/data/crosscheck_sanity.jsonl``). Side by side on the same rows: the AUROC of the home's
calibrated P(correct), of the mean and highest MiniLM similarity of the candidate to the jurors'
answers, and of the candidate sitting in the largest agreement cluster; on the sanity suite, the
share of questions whose correct answer scores above the plainly wrong one, for each; and the
seconds the answers cost per question.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._report import print_table, write_json  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
SHORT_SOURCES = ("mmlu_mc", "truthfulqa", "halueval_qa")
BAD_JURORS = {"shuffled": "shuffled-juror", "shuffled-dev": "shuffled-dev-juror", "misled": "misled-juror"}


def open_home_jury(home: str | None, registry_dir: Path | None = None, cpu_dtype: str | None = None):
    """The home's jury; with ``registry_dir``, reputations and verdicts go to a scratch registry;
    with ``cpu_dtype``, its pool runs in that precision on CPU (default: the policy's)."""
    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig
    from jury.crosscheck import open_jury
    from registry import Registry
    from registry.home import MoseHome

    home_dir = MoseHome.from_env(home)
    pool = None
    if cpu_dtype is not None:
        config = PoolConfig(policy=DevicePolicy(cpu_dtype=cpu_dtype))
        pool = ExpertPool.from_registry(Registry.open(home_dir), config, home=home_dir)
    jury = open_jury(home_dir, require_calibrator=True, pool=pool)
    if registry_dir is not None:
        jury.registry = Registry.open(MoseHome.from_env(registry_dir))
    return jury


def rows_of(sources: tuple[str, ...] | None, per_source: int, test: bool, seed: int):
    from jury.crosscheck import load_rows, stratified_sample

    rows = [
        r
        for r in load_rows(DATA / "crosscheck_dev.jsonl")
        if r.is_test() == test and (sources is None or r.source in sources)
    ]
    return stratified_sample(rows, per_source, seed)


# ---------------------------------------------------------------------------------------- speed

SPEED_PATHS = {  # name -> (shared trunk, adapters read the question, the probe's answer state kept)
    "plain": (False, True, True),
    "ours, adapters read the question": (True, True, True),
    "ours (default: answer-only adapters)": (True, False, True),
    "ours, default, without the probe's state": (True, False, False),
}
CHUNKS = (1, 16, 48)  # items per call


def speed(args: argparse.Namespace) -> None:
    from experts import policy
    from jury.crosscheck import collect

    if args.glibc_allocator:  # the baseline of policy.reuse_freed_memory, which acts process-wide
        policy.reuse_freed_memory = lambda: False
    jury = open_home_jury(args.home)
    rows = rows_of(SHORT_SOURCES, args.items // len(SHORT_SOURCES), test=True, seed=1)
    collect(jury, rows[:4], progress=False)  # warm-up: prefix caches, allocator
    results, calibrator = {}, jury.calibrator
    for _ in range(2):  # alternate, so drift on the machine hits every path alike
        for path, (shared, reads_question, probe_state) in SPEED_PATHS.items():
            jury.pool.config.shared_trunk = shared
            jury.config.adapters_read_question = reads_question
            # without a calibrator the jury asks for no answer state (what a probe-less calibrator does)
            jury.calibrator = calibrator if probe_state else None
            for chunk in CHUNKS:
                started = time.perf_counter()
                collect(jury, rows, progress=False, chunk=chunk)
                results.setdefault((path, chunk), []).append(len(rows) / (time.perf_counter() - started))
    best = {key: max(values) for key, values in results.items()}
    notes = {
        "plain": "a full forward pass per juror and text",
        "ours, adapters read the question": "shared trunk + cached prefixes",
        "ours (default: answer-only adapters)": "+ the question through the upper layers once",
        "ours, default, without the probe's state": "what the probe's layer-20 state costs",
    }
    table = []
    for path in SPEED_PATHS:
        for chunk in CHUNKS:
            speedup = None if path == "plain" else f"{best[(path, chunk)] / best[('plain', chunk)]:.2f}x plain"
            note = notes[path] if chunk == 1 else None
            calls = "one item per call" if chunk == 1 else f"{chunk} items per call"
            table.append((f"{path}, {calls}", f"{best[(path, chunk)]:.2f}", "; ".join(filter(None, (speedup, note)))))
    allocator = "glibc's default allocator" if args.glibc_allocator else "freed memory reused (the default)"
    print_table(
        f"Jury evidence, k=3 + base, {len(rows)} short-answer rows (items/s, best of 2), {allocator}, "
        f"pool in {jury.pool.dtype}",
        table,
    )
    write_json(
        args.json,
        {
            "rows": len(rows),
            "pool_dtype": str(jury.pool.dtype),
            "allocator": allocator,
            "items_per_s": {path: {str(chunk): best[(path, chunk)] for chunk in CHUNKS} for path in SPEED_PATHS},
        },
    )


# ------------------------------------------------------------------------------------ precision


def precision(args: argparse.Namespace) -> None:
    import torch

    from experts.policy import cpu_has_bf16_instructions
    from jury.calibrator import EVIDENCE_FEATURES
    from jury.crosscheck import calibrator_inputs, collect

    base, bf16 = "float32 (MOSE_CPU_DTYPE=float32)", "bf16 (MOSE_CPU_DTYPE=bfloat16)"
    juries = {
        name: open_home_jury(args.home, cpu_dtype=dtype) for name, dtype in ((base, "float32"), (bf16, "bfloat16"))
    }
    rows = rows_of(SHORT_SOURCES, args.items // len(SHORT_SOURCES), test=True, seed=1)
    rates, evidence = {}, {}
    for jury in juries.values():
        collect(jury, rows[:4], progress=False)  # warm-up: prefix caches, allocator
    for _ in range(2):  # alternate, so drift on the machine hits both alike
        for name, jury in juries.items():
            started = time.perf_counter()
            evidence[name] = collect(jury, rows, progress=False, chunk=len(rows))
            rates[name] = max(rates.get(name, 0.0), len(rows) / (time.perf_counter() - started))
    table = [
        (
            f"{name}, items/s ({len(rows)} per call, best of 2)",
            f"{rate:.2f}",
            f"{rate / rates[base]:.2f}x fp32" if name == bf16 else "",
        )
        for name, rate in rates.items()
    ]
    gaps = {}
    for feature in EVIDENCE_FEATURES:
        ours = [e.values[feature] for e in evidence[base]]
        moved = _gap(ours, [e.values[feature] for e in evidence[bf16]])
        gaps[feature] = {"mean": moved.mean(), "max": moved.max(), "sd_float32": np.std(ours)}
        table.append(
            (
                f"|{feature} bf16 - fp32|: mean / max",
                f"{moved.mean():.4f} / {moved.max():.4f}",
                f"its spread (sd) over the rows: {np.std(ours):.3f}",
            )
        )
    states = [np.array([e.answer_state for e in evidence[name]]) for name in (base, bf16)]
    state_gap = np.linalg.norm(states[1] - states[0]) / np.linalg.norm(states[0])
    table.append(("answer state (the probe's input): relative L2 gap", f"{state_gap:.4f}", ""))
    calibrator = juries[base].calibrator
    p = [calibrator.predict(calibrator_inputs(calibrator, evidence[name])) for name in (base, bf16)]
    moved = _gap(*p)
    table.append(
        (
            f"|P(correct)| moved, calibrator {calibrator.version}: mean / max",
            f"{moved.mean():.4f} / {moved.max():.4f}",
            f"fitted on {calibrator.trained_on.get('pool_dtype', 'float32')} evidence",
        )
    )
    print_table(
        f"Jury evidence on CPU, float32 vs bf16: default path, k=3 + base, {len(rows)} short-answer rows "
        f"({torch.backends.cpu.get_cpu_capability()}, bf16 instructions: {cpu_has_bf16_instructions()})",
        table,
    )
    write_json(
        args.json,
        {
            "rows": len(rows),
            "items_per_s": {"float32": rates[base], "bf16": rates[bf16]},
            "evidence_gap": gaps,
            "answer_state_relative_l2": state_gap,
            "p_correct_moved": {"mean": moved.mean(), "max": moved.max(), "calibrator": calibrator.version},
        },
    )


def _gap(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


# ----------------------------------------------------------------------------------- reputation


def train_bad_juror(jury, kind: str, steps: int, seed: int, exclude: set[str]) -> float:
    """Fine-tune the bad LoRA on pairs of ``kind`` (train-bucket rows outside ``exclude`` only)
    and add it to the jury's pool."""
    from experts.finetune import FinetuneConfig, load_base_for_training, train_lora

    pairs = bad_pairs(kind, seed, exclude)
    config = FinetuneConfig(steps=steps, batch_size=8, learning_rate=2e-3, top_layers=10, max_tokens=64, seed=seed)
    model, tokenizer = load_base_for_training()
    _, adapter = train_lora(model, tokenizer, pairs, config, progress=True, label=BAD_JURORS[kind])
    jury.pool.add_adapter(BAD_JURORS[kind], adapter.lora_config, adapter.state_dict)
    return adapter.seconds


def bad_pairs(kind: str, seed: int, exclude: set[str]):
    """The bad juror's training pairs, drawn and ordered with ``seed``."""
    from experts.finetune import QAPair, load_pairs
    from jury.crosscheck import load_rows

    rng = random.Random(seed)
    if kind == "shuffled":
        pairs = load_pairs(DATA / "sft" / "general_knowledge.jsonl")
        answers = [p.answer for p in pairs]
        rng.shuffle(answers)
        return [QAPair(p.question, a) for p, a in zip(pairs, answers)]
    rows = [r for r in load_rows(DATA / "crosscheck_dev.jsonl") if not r.is_test() and r.digest() not in exclude]
    if kind == "misled":
        pairs = [QAPair(r.question, r.answer) for r in rows if r.label == 0]
    else:  # shuffled-dev: each source's answers dealt out again among its own questions
        pairs = []
        for source in sorted({r.source for r in rows}):
            group = [r for r in rows if r.source == source]
            answers = [r.answer for r in group]
            rng.shuffle(answers)
            pairs += [QAPair(r.question, a) for r, a in zip(group, answers)]
    rng.shuffle(pairs)
    return pairs


def panel(item, bad: str | None, weights: dict[str, float]):
    """The row's jury (router's experts + base), with the bad juror ``bad`` seated or not (None)."""
    from experts.types import BASE_EXPERT

    found = {j.expert: j for j in item.jurors}
    routed = [j for j in item.jurors if j.expert != BASE_EXPERT and j.expert not in BAD_JURORS.values()]
    chosen = routed + ([found[bad]] if bad else []) + [found[BASE_EXPERT]]
    return [j.model_copy(update={"weight": weights.get(j.expert, 1.0)}) for j in chosen]


def jury_auroc(jury, evidence, bad: str | None, weights: dict[str, float]) -> dict[str, float]:
    from jury.checks import text_checks
    from jury.crosscheck import auroc

    p = np.array(
        [
            jury.probability(
                jury.evidence_values(
                    panel(e, bad, weights), e.row.question, text_checks(e.row.question, e.row.answer), None
                )
            )
            for e in evidence
        ]
    )
    labels = np.array([e.row.label for e in evidence])
    sources = np.array([e.row.source for e in evidence])
    out = {"all": auroc(labels, p)}
    out.update({s: auroc(labels[sources == s], p[sources == s]) for s in sorted(set(sources))})
    return out


def relative_weight(weights: dict[str, float], bad: str) -> float:
    """The bad juror's weight over the median real expert's (the base model left out)."""
    from experts.types import BASE_EXPERT

    return weights[bad] / float(np.median([w for name, w in weights.items() if name not in (bad, BASE_EXPERT)]))


def reputation(args: argparse.Namespace) -> None:
    from jury.crosscheck import collect, save_evidence

    with tempfile.TemporaryDirectory(prefix="mose-reputation-") as scratch:
        jury = open_home_jury(args.home, Path(scratch))
        bad = BAD_JURORS[args.bad_juror]
        feedback_rows = rows_of(None, args.feedback, test=False, seed=args.seed)
        heldout_rows = rows_of(None, args.heldout, test=True, seed=args.seed)
        seconds = train_bad_juror(jury, args.bad_juror, args.steps, args.seed, {r.digest() for r in feedback_rows})
        evidence = collect(jury, feedback_rows + heldout_rows, extra=[bad])
        if args.save_evidence:
            save_evidence(evidence, args.save_evidence)
        feedback_ev, heldout_ev = evidence[: len(feedback_rows)], evidence[len(feedback_rows) :]
        names = sorted({j.expert for e in evidence for j in e.jurors})
        before = {name: jury.weight(name) for name in names}

        order = list(range(len(feedback_ev)))
        random.Random(args.seed).shuffle(order)  # feedback arrives in no particular source order
        for index in order:
            item = feedback_ev[index]
            weights = {name: jury.weight(name) for name in names}
            verdict = jury.record(jury.verdict(item.row.question, item.row.answer, panel(item, bad, weights), None))
            jury.feedback(verdict.id, bool(item.row.label), actor="benchmark")
        after = {name: jury.weight(name) for name in names}
        prior = {name: 1.0 for name in names}

        scores = {
            "jury without the bad juror": jury_auroc(jury, heldout_ev, None, prior),
            "jury with it, before feedback": jury_auroc(jury, heldout_ev, bad, prior),
            f"jury with it, after {len(order)} feedback events": jury_auroc(jury, heldout_ev, bad, after),
            "jury without it, after feedback": jury_auroc(jury, heldout_ev, None, after),
        }
        print_table(
            f"Juror weights (reputation), {len(order)} feedback events; bad juror fine-tuned "
            f"{args.steps} steps ({args.bad_juror}, {seconds:.0f} s)",
            [
                (name, f"{before[name]:.2f} -> {after[name]:.2f}", "deliberately bad" if name == bad else "")
                for name in names
            ],
        )
        sources = sorted(next(iter(scores.values())))
        print(f"\nCalibrated jury AUROC on {len(heldout_ev)} held-out rows (test bucket)\n")
        print("| jury | " + " | ".join(sources) + " |")
        print("|---|" + "---|" * len(sources))
        for label, per in scores.items():
            print(f"| {label} | " + " | ".join(f"{per[s]:.3f}" for s in sources) + " |")
        print(
            f"\nbad juror's weight / the median expert's: {relative_weight(before, bad):.2f} -> "
            f"{relative_weight(after, bad):.2f}"
        )
        gap = (
            scores["jury without the bad juror"]["all"]
            - scores[f"jury with it, after {len(order)} feedback events"]["all"]
        )
        print(f"\ngap to the jury without it after feedback: {gap:+.3f} (target <= 0.02)")
        write_json(
            args.json,
            {
                "bad_juror": bad,
                "feedback_events": len(order),
                "weights_before": before,
                "weights_after": after,
                "auroc": scores,
                "gap": gap,
                "bad_over_median_before": relative_weight(before, bad),
                "bad_over_median_after": relative_weight(after, bad),
            },
        )


# ---------------------------------------------------------------------------------- own answers


def own_answers(args: argparse.Namespace) -> None:
    from benchmarks.sanity import KINDS, load_suite
    from jury.crosscheck import CheckRow, auroc, calibrator_inputs, collect
    from jury.jury import largest_cluster_contains_candidate

    jury = open_home_jury(args.home)
    labelled = rows_of(None, args.per_source, test=True, seed=args.seed)
    sanity = [
        CheckRow(
            question=r["question"],
            answer=r[kind],
            label=int(kind == "correct"),
            source="sanity_" + kind,
            domain=r["domain"],
        )
        for r in load_suite()
        for kind in KINDS
    ]
    rows = labelled + sanity
    evidence = collect(jury, rows, progress=False)
    p = jury.calibrator.predict(calibrator_inputs(jury.calibrator, evidence))
    questions = list(dict.fromkeys(r.question for r in rows))
    panels = {q: jurors for q, jurors in zip(questions, jury.select_many(questions))}
    requests = [
        req for q in questions for req in jury.own_answer_requests(q, [SimpleNamespace(expert=n) for n, _ in panels[q]])
    ]
    started = time.perf_counter()
    texts = [r.text for r in jury.pool.generate(requests)]
    seconds = (time.perf_counter() - started) / len(questions)
    answers, at = {}, 0
    for q in questions:
        answers[q], at = texts[at : at + len(panels[q])], at + len(panels[q])
    signals = {
        "calibrated P(correct)": list(p),
        "mean similarity to the jurors' answers": [],
        "highest similarity": [],
        "in the largest agreement cluster": [],
    }
    for row in rows:
        vectors = np.asarray(jury.embedder([row.answer] + answers[row.question]))
        similarity = vectors @ vectors.T
        signals["mean similarity to the jurors' answers"].append(float(similarity[0, 1:].mean()))
        signals["highest similarity"].append(float(similarity[0, 1:].max()))
        signals["in the largest agreement cluster"].append(
            float(largest_cluster_contains_candidate(similarity, jury.config.similarity_threshold))
        )
    sources = sorted({r.source for r in labelled})
    figures, table = {}, []
    for name, values in signals.items():
        values = np.asarray(values)
        lab = values[: len(labelled)]
        per = {
            src: auroc(
                [r.label for r in labelled if r.source == src], [v for r, v in zip(labelled, lab) if r.source == src]
            )
            for src in sources
        }
        by_question = values[len(labelled) :].reshape(-1, len(KINDS))
        above = float(np.mean(by_question[:, 0] > by_question[:, 1]))
        figures[name] = {
            "auroc": auroc([r.label for r in labelled], lab),
            "per_source": per,
            "sanity_correct_above_wrong": above,
        }
        per_text = ", ".join(f"{src} {per[src]:.2f}" for src in sources)
        table.append((name, f"{figures[name]['auroc']:.3f}", f"{per_text}; sanity, correct above wrong: {above:.0%}"))
    print_table(
        f"The jurors' own answers: AUROC on {len(labelled)} labelled test-bucket rows, and "
        f"{len(sanity) // len(KINDS)} sanity questions; k=3 + base, {jury.config.own_answer_tokens} greedy "
        f"tokens each, {seconds:.2f} s of answers per question (calibrator {jury.calibrator_version})",
        table,
    )
    write_json(
        args.json,
        {
            "labelled_rows": len(labelled),
            "sanity_questions": len(sanity) // len(KINDS),
            "seconds_per_question": seconds,
            "calibrator": jury.calibrator_version,
            "signals": figures,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    fast = sub.add_parser("speed", help="evidence items/s, plain vs shared trunk")
    fast.add_argument("--home", default=None, help="data directory (default $MOSE_HOME or ./.mose)")
    fast.add_argument("--items", type=int, default=48, help="short-answer rows (split over 3 sources)")
    fast.add_argument(
        "--glibc-allocator",
        action="store_true",
        help="leave glibc's allocator as it is instead of reusing freed memory (the pool's default): "
        "the baseline, which one process cannot run beside it",
    )
    fast.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    dtype = sub.add_parser("precision", help="evidence on CPU in float32 vs bf16: speed and drift")
    dtype.add_argument("--home", default=None, help="data directory (default $MOSE_HOME or ./.mose)")
    dtype.add_argument("--items", type=int, default=48, help="short-answer rows (split over 3 sources)")
    dtype.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    bad = sub.add_parser("reputation", help="a bad juror, feedback, and the jury's AUROC")
    bad.add_argument("--home", default=None, help="data directory (default $MOSE_HOME or ./.mose)")
    bad.add_argument("--feedback", type=int, default=30, help="feedback rows per source (train bucket)")
    bad.add_argument("--heldout", type=int, default=40, help="held-out rows per source (test bucket)")
    bad.add_argument("--steps", type=int, default=40, help="fine-tuning steps of the bad juror")
    bad.add_argument(
        "--bad-juror",
        choices=sorted(BAD_JURORS),
        default="shuffled",
        help="shuffled: shuffled general-knowledge pairs; shuffled-dev: the large model's answers dealt "
        "out among other questions of their source; misled: wrong answers to other questions",
    )
    bad.add_argument("--seed", type=int, default=0)
    bad.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    bad.add_argument(
        "--save-evidence",
        default=None,
        metavar="FILE",
        help="also write the jurors' evidence (bad juror included) as JSONL",
    )
    own = sub.add_parser("own-answers", help="the jurors' own answers as evidence: AUROC and sanity beside P(correct)")
    own.add_argument("--home", default=None, help="data directory (default $MOSE_HOME or ./.mose)")
    own.add_argument("--per-source", type=int, default=12, help="labelled test-bucket rows per source")
    own.add_argument("--seed", type=int, default=0)
    own.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    {"speed": speed, "precision": precision, "reputation": reputation, "own-answers": own_answers}[args.what](args)


if __name__ == "__main__":
    main()
