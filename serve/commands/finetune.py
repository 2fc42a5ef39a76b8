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

from serve.commands._common import add_common_flags, emit, home_of


def add_expert_subcommands(expert_sub: argparse._SubParsersAction) -> None:
    """Register ``finetune`` under ``mose expert``."""
    parser = expert_sub.add_parser("finetune", help="fine-tune a LoRA expert from question/answer pairs",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--data", required=True, help="JSONL file with 'question' and 'answer' fields")
    parser.add_argument("--domain", required=True, help="taxonomy domain the expert serves (e.g. law)")
    parser.add_argument("--name", required=True, help="expert name (lowercase slug, e.g. my-law-expert)")
    parser.add_argument("--version", default="0.1.0", help="expert version (default 0.1.0)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 4)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per question+answer (default 96)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out rows (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="seed of split, order and init (default 0)")
    parser.add_argument("--owner", default="local", help="owner recorded in the manifest")
    parser.add_argument("--license", default="Apache-2.0", help="licence recorded in the manifest")
    parser.add_argument("--out", default=None, help="output folder (default MOSE_HOME/finetuned/NAME-VERSION)")
    parser.add_argument("--register", action="store_true", help="register and activate the expert")
    parser.set_defaults(func=run)


_CONFIG_FLAGS = {"steps": "steps", "rank": "rank", "batch_size": "batch_size", "lr": "learning_rate",
                 "max_tokens": "max_tokens", "heldout": "heldout_rows", "seed": "seed"}


def run(args: argparse.Namespace) -> int:
    from experts.finetune import FinetuneConfig, finetune
    from experts.types import validate
    from serve.activation import activate

    overrides = {field: getattr(args, flag) for flag, field in _CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    config = validate(FinetuneConfig, overrides, "fine-tune options")
    activations = []

    def activate_and_teach(registry, name: str, version: str, actor: str) -> None:
        # The one activation every entry point uses: the router learns the domain, a running server loads it.
        with contextlib.redirect_stdout(sys.stderr):  # the router update's progress
            activations.append(activate(registry, name, version, actor, progress=not args.json))

    result = finetune(args.data, args.domain, args.name, config, out_dir=args.out, home=home_of(args),
                      register=args.register, version=args.version, owner=args.owner, license=args.license,
                      progress=not args.json, activate=activate_and_teach)
    payload, text = result.model_dump(mode="json"), result.text()
    if activations:
        payload["router"] = activations[0].router_json()
        text += f"\n{activations[0].router_text()}"
    emit(args, payload, text)
    return 1 if activations and activations[0].router_error is not None else 0
