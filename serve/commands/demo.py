"""``mose demo build|docs``: the demo experts, one per vertical.

``build`` shapes each vertical of ``../shared/data/sft/`` (nine) into chat answers, trains one
shared seed adapter on the first share of every vertical's token budget (all verticals
together), then fine-tunes each vertical's LoRA expert from that seed on the rest of its own
budget, measures its held-out loss curve against the
base model on rows never trained on, registers and activates it, and records the results in
``MOSE_HOME/demo/report.json``. Slow on first run (minutes), a no-op after.

``docs`` renders that report as ``docs/experts.md`` (only when asked: building never writes into
the checkout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serve.commands._common import add_common_flags, emit, home_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="build the demo experts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    demo_sub = parser.add_subparsers(dest="demo_command", metavar="SUBCOMMAND")
    build = demo_sub.add_parser(
        "build",
        help="fine-tune and register one expert per vertical (cached)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(build)
    build.add_argument(
        "--data",
        default=None,
        help="folder holding sft/<vertical>.jsonl (default $MOSE_SHARED_DATA or <repo>/../shared/data)",
    )
    build.add_argument(
        "--profile",
        choices=["start", "full"],
        default="start",
        help="training budget: 'start' (12k tokens per expert, what `mose up` builds) or "
        "'full' (64k tokens, 2 epochs) (default start)",
    )
    build.add_argument(
        "--train-tokens", type=int, default=None, help="training tokens per expert (default: the profile's)"
    )
    build.add_argument(
        "--seed-share",
        type=float,
        default=None,
        help="share of each vertical's budget trained into the shared seed first (0: every expert "
        "starts from the base model; default 0.75)",
    )
    build.add_argument(
        "--seed-decays",
        action="store_true",
        help="decay the seed's learning rate too (default: the seed holds its peak and each expert "
        "decays it on its own rows)",
    )
    build.add_argument("--verticals", default=None, help="comma-separated subset of verticals (default: all nine)")
    build.set_defaults(func=run_build)
    docs = demo_sub.add_parser(
        "docs",
        help="write docs/experts.md from the last build's report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(docs)
    docs.add_argument("--data", default=None, help="folder holding the data README (attribution)")
    docs.add_argument("--out", default=None, help="page to write (default <repo>/docs/experts.md)")
    docs.add_argument(
        "--append",
        metavar="FILE",
        default=None,
        help="markdown to add before the data section (e.g. the table of benchmarks/mixture.py)",
    )
    docs.set_defaults(func=run_docs)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def _config(args: argparse.Namespace):
    from experts.demo import DemoConfig, profile_finetune
    from experts.types import validate

    overrides: dict = {"profile": getattr(args, "profile", None) or "start"}
    if args.data:
        overrides["data_dir"] = args.data
    if getattr(args, "verticals", None):
        overrides["verticals"] = [v.strip() for v in args.verticals.split(",") if v.strip()]
    if getattr(args, "seed_share", None) is not None:
        overrides["seed_share"] = args.seed_share
    if getattr(args, "seed_decays", False):
        overrides["seed_holds_lr"] = False
    if getattr(args, "train_tokens", None) is not None:
        settings = profile_finetune(overrides["profile"]).model_dump() | {"train_tokens": args.train_tokens}
        overrides["finetune"] = settings
    return validate(DemoConfig, overrides, "demo options")


def run_build(args: argparse.Namespace) -> int:
    from experts.demo import build_demo

    report = build_demo(home_of(args), _config(args), progress=not args.json)
    emit(args, report.model_dump(mode="json"), report.text())
    return 0


def run_docs(args: argparse.Namespace) -> int:
    from experts.demo import REPO_ROOT, load_report, render_docs
    from registry.errors import MoseError

    home = home_of(args)
    report = load_report(home)
    if report is None:
        raise MoseError(f"no demo build report in {home.root}: run `mose demo build` first")
    args.profile = report.profile
    out = Path(args.out) if args.out else REPO_ROOT / "docs" / "experts.md"
    extra = Path(args.append).read_text(encoding="utf-8") if args.append else ""
    out.write_text(render_docs(report, _config(args), extra), encoding="utf-8")
    emit(args, {"written": str(out)}, f"wrote {out}")
    return 0
