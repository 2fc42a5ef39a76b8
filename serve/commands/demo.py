"""``mose demo build``: fine-tune, register and activate one demo expert per vertical.

Trains a LoRA expert for each vertical of ``../shared/data/sft/`` (nine), measures the expert x
vertical matrix of held-out answer loss (plus the base model), prints it and writes it to
docs/experts.md. Slow on first run (minutes), a no-op after.
"""

from __future__ import annotations

import argparse

from serve.commands._common import add_common_flags, emit, home_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="build the demo experts", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    demo_sub = parser.add_subparsers(dest="demo_command", metavar="SUBCOMMAND")
    build = demo_sub.add_parser("build", help="fine-tune and register one expert per vertical (cached)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(build)
    build.add_argument("--data", default=None, help="folder holding sft/<vertical>.jsonl "
                                                    "(default $MOSE_SHARED_DATA or <repo>/../shared/data)")
    build.add_argument("--steps", type=int, default=None, help="fine-tune steps per expert (default 12)")
    build.add_argument("--verticals", default=None, help="comma-separated subset of verticals (default: all nine)")
    build.add_argument("--no-docs", action="store_true", help="do not write docs/experts.md")
    build.set_defaults(func=run_build)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def run_build(args: argparse.Namespace) -> int:
    from experts.demo import DemoConfig, build_demo
    from experts.types import validate

    overrides: dict = {}
    if args.data:
        overrides["data_dir"] = args.data
    if args.verticals:
        overrides["verticals"] = [v.strip() for v in args.verticals.split(",") if v.strip()]
    if args.no_docs:
        overrides["docs_path"] = None
    config = validate(DemoConfig, overrides, "demo options")
    if args.steps is not None:
        config = config.model_copy(update={"finetune": validate(
            type(config.finetune), config.finetune.model_dump() | {"steps": args.steps}, "demo options")})
    report = build_demo(home_of(args), config, progress=not args.json)
    emit(args, report.model_dump(mode="json"), report.text())
    return 0
