"""``mose expert finetune``: added to the ``expert`` group by :mod:`serve.commands.expert`.

LoRA fine-tuning of the base model on a question/answer JSONL file (fields ``question`` and
``answer``), loss on the answer tokens only, seeded; prints the held-out loss of the adapter and
of the base model on the same rows, writes a registrable expert folder, and with ``--register``
registers and activates it the way ``mose expert activate`` does (:mod:`serve.activation`: the
router learns the expert's domain if it did not know it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from experts.finetune import FinetuneConfig
from serve.commands._common import add_common_flags, emit, home_of
from serve.commands._config_args import add_config_arguments, config_from_args

# FinetuneConfig fields that are flags (the rest: a Python caller's choice).
FINETUNE_FLAGS = (
    "steps",
    "epochs",
    "train_tokens",
    "batch_size",
    "learning_rate",
    "rank",
    "alpha",
    "top_layers",
    "max_tokens",
    "heldout_rows",
    "max_train_rows",
    "seed",
)


def add_expert_subcommands(expert_sub: argparse._SubParsersAction) -> None:
    """Register ``finetune`` under ``mose expert``."""
    parser = expert_sub.add_parser(
        "finetune",
        help="fine-tune a LoRA expert from question/answer pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser)
    parser.add_argument("--data", required=True, help="JSONL file with 'question' and 'answer' fields")
    parser.add_argument("--domain", required=True, help="taxonomy domain the expert serves (e.g. law)")
    parser.add_argument("--name", required=True, help="expert name (lowercase slug, e.g. my-law-expert)")
    parser.add_argument("--version", default="0.1.0", help="expert version (default 0.1.0)")
    add_config_arguments(
        parser,
        FinetuneConfig,
        FINETUNE_FLAGS,
        names={"learning_rate": ("--learning-rate", "--lr"), "heldout_rows": ("--heldout-rows", "--heldout")},
    )
    parser.add_argument("--owner", default="local", help="owner recorded in the manifest")
    parser.add_argument("--license", default="Apache-2.0", help="licence recorded in the manifest")
    parser.add_argument("--out", default=None, help="output folder (default MOSE_HOME/finetuned/NAME-VERSION)")
    parser.add_argument("--register", action="store_true", help="register and activate the expert")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experts.finetune import finetune
    from serve.activation import activate

    config = config_from_args(FinetuneConfig, args, what="fine-tune options")
    activations = []

    def activate_and_teach(registry, name: str, version: str, actor: str) -> None:
        # The one activation every entry point uses: the router learns the domain, a running server loads it.
        with contextlib.redirect_stdout(sys.stderr):  # the router update's progress
            activations.append(activate(registry, name, version, actor, progress=not args.json))

    result = finetune(
        args.data,
        args.domain,
        args.name,
        config,
        out_dir=args.out,
        home=home_of(args),
        register=args.register,
        version=args.version,
        owner=args.owner,
        license=args.license,
        progress=not args.json,
        activate=activate_and_teach,
    )
    payload, text = result.model_dump(mode="json"), result.text()
    if activations:
        payload["router"] = activations[0].router_json()
        text += f"\n{activations[0].router_text()}"
    emit(args, payload, text)
    return 1 if activations and activations[0].router_error is not None else 0
