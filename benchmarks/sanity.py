"""Does the jury catch what a person would? 40 hand-written questions across the ten verticals.

    .venv/bin/python benchmarks/sanity.py --home .mose            # after `make start`
    .venv/bin/python benchmarks/sanity.py --home .mose --json out.json

Each question of ``tests/data/crosscheck_sanity.jsonl`` has a correct answer, a plainly wrong one
and an off-topic one (the correct answer of a question from another vertical). The jury scores
all three with the home's calibrator. Printed: the share of questions where the correct answer
gets the highest P(correct), the share of off-topic and of wrong answers flagged, and the rows
that miss. ``tests/integration/test_crosscheck_sanity.py`` holds the same suite to its targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SUITE = REPO / "tests" / "data" / "crosscheck_sanity.jsonl"
KINDS = ("correct", "wrong", "off_topic")


def load_suite(path: Path = SUITE) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_suite(jury, suite: list[dict]) -> list[dict]:
    """Per question: P(correct) and flagged for each kind of answer (one batched evidence pass)."""
    items = [(row["question"], row[kind]) for row in suite for kind in KINDS]
    juries = jury.select_many([q for q, _ in items])
    evidence = jury.evidence_many([(q, a, panel) for (q, a), panel in zip(items, juries)])
    out = []
    for i, row in enumerate(suite):
        result = {"domain": row["domain"], "question": row["question"]}
        for j, kind in enumerate(KINDS):
            verdict = jury.verdict(*items[3 * i + j], evidence[3 * i + j], None)
            result[kind] = {"answer": row[kind], "p_correct": verdict.p_correct, "flagged": verdict.flagged}
        out.append(result)
    return out


def summary(scored: list[dict]) -> dict:
    n = len(scored)
    best = [r for r in scored if r["correct"]["p_correct"] > max(r["wrong"]["p_correct"], r["off_topic"]["p_correct"])]
    return {
        "questions": n,
        "correct_highest": len(best) / n,
        "off_topic_flagged": sum(r["off_topic"]["flagged"] for r in scored) / n,
        "wrong_flagged": sum(r["wrong"]["flagged"] for r in scored) / n,
        "correct_flagged": sum(r["correct"]["flagged"] for r in scored) / n,
        "misses": [
            {"question": r["question"], **{k: round(r[k]["p_correct"], 3) for k in KINDS}}
            for r in scored
            if r not in best or not r["off_topic"]["flagged"]
        ],
    }


def table(result: dict) -> str:
    lines = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| correct answer gets the highest P(correct) | {result['correct_highest']:.0%} | >= 90 % |",
        f"| off-topic answers flagged | {result['off_topic_flagged']:.0%} | 100 % |",
        f"| plainly wrong answers flagged | {result['wrong_flagged']:.0%} | |",
        f"| correct answers flagged | {result['correct_flagged']:.0%} | |",
    ]
    lines += ["", "misses (P(correct) of correct / wrong / off-topic):"]
    lines += [
        f"  {m['question'][:60]:60s} {m['correct']:.2f} / {m['wrong']:.2f} / {m['off_topic']:.2f}"
        for m in result["misses"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jury.crosscheck import open_jury
    from registry.home import MoseHome

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--home",
        default=os.environ.get("MOSE_HOME", str(REPO / ".mose")),
        help="data directory with experts, router and calibrator (default $MOSE_HOME or .mose)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    jury = open_jury(MoseHome.from_env(args.home), require_calibrator=True)
    result = {"calibrator": jury.calibrator_version, **summary(score_suite(jury, load_suite()))}
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
