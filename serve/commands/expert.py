"""``mose expert``: register community experts and manage their lifecycle.

Sub-commands: add, list, show, activate, retire, quarantine, remove, verify, sign, schema,
domains (and ``finetune``, added by :mod:`serve.commands.finetune`).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC
from pathlib import Path

from serve.commands import finetune
from serve.commands._common import add_common_flags, emit, home_of


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "expert",
        help="register, inspect and manage experts",
        description="Register community experts (manifest + safetensors files), move them through "
        "pending -> active -> retired (or quarantined), and check their files.",
    )
    sub = parser.add_subparsers(dest="expert_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])

    add = _sub(
        sub,
        "add",
        _add,
        "register an expert from its manifest (status: pending)",
        "Validate MANIFEST (YAML or JSON), check every listed file's sha256 and safety (safetensors "
        "and small JSON/tokenizer files only; no pickles, no remote code), verify the team signature "
        "(the manifest's ed25519 signature, and an OMS bundle: --bundle, or model.sig in the files "
        "folder when present) when the registry requires one, copy the files into the content-addressed "
        "store and record the expert as pending. Registering the same name@version with the same files "
        "again is a no-op.",
    )
    add.add_argument(
        "manifest", type=Path, help="path to manifest.yaml / manifest.json, or the expert folder holding it"
    )
    add.add_argument(
        "--files", type=Path, default=None, help="folder holding the files (default: the manifest's folder)"
    )
    add.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="OMS bundle of the files folder (default: model.sig in that folder, when present)",
    )
    add.add_argument("--actor", default="cli", help="who is registering (recorded in the audit log)")

    lst = _sub(sub, "list", _list, "list registered experts", "List every registered name@version.")
    lst.add_argument("--status", choices=("pending", "active", "quarantined", "retired"), help="only this status")
    lst.add_argument("--domain", help="only experts serving this domain")

    show = _sub(sub, "show", _show, "show one expert", "Show an expert's manifest, status and stored files.")
    show.add_argument("ref", metavar="NAME[@VERSION]", help="expert (default version: the highest)")

    for verb, func, text in (
        (
            "activate",
            _activate,
            "make a version active (default: the highest); the previously active version is "
            "retired, and the router learns the expert's domain if it did not know it (routable at once, also by a "
            "running server)",
        ),
        ("retire", _retire, "retire a version (default: the active one)"),
    ):
        cmd = _sub(sub, verb, func, text.split(";")[0], text[0].upper() + text[1:] + ".")
        cmd.add_argument("ref", metavar="NAME[@VERSION]")
        cmd.add_argument("--actor", default="cli", help="who makes the change (audit log)")

    quarantine = _sub(
        sub,
        "quarantine",
        _quarantine,
        "take a version out of service pending review",
        "Quarantine an expert version (default: the active one).",
    )
    quarantine.add_argument("ref", metavar="NAME[@VERSION]")
    quarantine.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    quarantine.add_argument("--actor", default="cli", help="who makes the change (audit log)")

    remove = _sub(
        sub,
        "remove",
        _remove,
        "delete a non-active version's record",
        "Remove a pending, retired or quarantined NAME@VERSION (audited).",
    )
    remove.add_argument("ref", metavar="NAME@VERSION")
    remove.add_argument("--actor", default="cli", help="who makes the change (audit log)")

    verify = _sub(
        sub,
        "verify",
        _verify,
        "re-hash an expert's stored files",
        "Re-hash the stored blobs of NAME[@VERSION]; exit 1 if any is missing or corrupted.",
    )
    verify.add_argument("ref", metavar="NAME[@VERSION]")

    sign = _sub(
        sub,
        "sign",
        _sign,
        "sign a manifest (ed25519) or an expert folder (OMS bundle) with a team key",
        "--format ed25519 (default): add an ed25519 signature (over the manifest, file digests "
        "included) to MANIFEST, in place unless --output is given; make the key with `mose keys "
        "generate TEAM`. --format oms: write an OpenSSF Model Signing bundle (ECDSA P-256, offline) "
        "over every file of the expert folder, MANIFEST included, to FOLDER/model.sig or --bundle; make "
        "the key with `mose keys generate TEAM --type p256`. With both, sign ed25519 first: it rewrites "
        "the manifest, which the bundle covers.",
    )
    sign.add_argument("manifest", type=Path)
    sign.add_argument(
        "--key",
        type=Path,
        required=True,
        help="the team's private key file (TEAM.key, or TEAM.p256.key for --format oms)",
    )
    sign.add_argument(
        "--format",
        dest="sig_format",
        choices=("ed25519", "oms"),
        default="ed25519",
        help="ed25519 signature in the manifest (default), or an OMS bundle of the folder",
    )
    sign.add_argument("--team", default=None, help="team name (default: the key file's name; ed25519 only)")
    sign.add_argument("--output", type=Path, default=None, help="write the signed manifest here (ed25519 only)")
    sign.add_argument(
        "--files",
        type=Path,
        default=None,
        help="the expert folder to sign (oms only; default: the manifest's folder, which must hold it)",
    )
    sign.add_argument(
        "--bundle", type=Path, default=None, help="where to write the bundle (oms only; default: FOLDER/model.sig)"
    )

    schema = _sub(
        sub,
        "schema",
        _schema,
        "print the manifest JSON Schema",
        "Print the JSON Schema of expert manifests (for editors and CI of expert teams).",
        json_flag=False,
    )

    domains = _sub(
        sub,
        "domains",
        _domains,
        "list (or add) taxonomy domains",
        "Show the domain taxonomy: verticals and their sub-domains. With --add, add a domain.",
    )
    domains.add_argument("--add", metavar="NAME", help="add this domain")
    domains.add_argument("--parent", help="parent of the added domain (default: a new vertical)")
    domains.add_argument("--actor", default="cli", help="who makes the change (audit log)")

    del schema
    finetune.add_expert_subcommands(sub)


def _sub(sub, name: str, func, help_text: str, description: str, json_flag: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=description)
    add_common_flags(parser, json_flag=json_flag)
    parser.set_defaults(func=func)
    return parser


def _open(args: argparse.Namespace):
    from registry import Registry

    return Registry.open(home_of(args))


def _ref(text: str) -> tuple[str, str | None]:
    from registry import split_ref

    return split_ref(text)


def _summary(record) -> dict:
    return {
        "name": record.name,
        "version": record.version,
        "status": record.status,
        "kind": record.kind,
        "base_model": record.base_model,
        "domains": record.domains,
        "owner": record.manifest.owner,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def _manifest_path(path: Path) -> Path:
    """A manifest file, or the manifest inside an expert folder."""
    from registry.errors import ManifestError
    from registry.oms import MANIFEST_NAMES

    if not path.is_dir():
        return path
    found = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
    if not found:
        raise ManifestError(f"{path}: no manifest in the folder (looked for {', '.join(MANIFEST_NAMES)})")
    return found[0]


def _add(args: argparse.Namespace) -> int:
    from datetime import datetime

    started = datetime.now(UTC)
    with _open(args) as reg:
        record = reg.add(_manifest_path(args.manifest), files_dir=args.files, actor=args.actor, bundle=args.bundle)
        provenance = reg.provenance(record.name, record.version)
    if record.created_at < started:  # same name@version and files were already there: a no-op
        text = f"{record.ref} was already registered with these files ({record.status}); nothing to do"
    else:
        text = f"registered {record.ref} ({record.status}); activate it with `mose expert activate {record.ref}`"
        if (oms := provenance.get("oms")) and oms.get("status") == "verified":
            text += f"\n  OMS bundle {oms['bundle']} verified with the key of {oms['key']} ({oms['fingerprint']})"
    emit(args, {**_summary(record), "provenance": provenance}, text)
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _list(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        records = reg.list(status=args.status, domain=args.domain)
    if not records:
        emit(args, [], "no experts registered" + (f" with status {args.status}" if args.status else ""))
        return 0
    rows = [["NAME", "VERSION", "STATUS", "KIND", "DOMAINS", "OWNER"]] + [
        [r.name, r.version, r.status, r.kind, ",".join(r.domains), r.manifest.owner] for r in records
    ]
    emit(args, [_summary(r) for r in records], _table(rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        record = reg.get(*_ref(args.ref))
        blobs = reg.blob_paths(record)
        chains = {d: reg.taxonomy.chain(d) for d in record.domains}
        provenance = reg.provenance(record.name, record.version)
    oms = provenance.get("oms")
    payload = {
        **_summary(record),
        "provenance": provenance,
        "manifest": record.manifest.model_dump(mode="json"),
        "blobs": {rel: str(path) for rel, path in blobs.items()},
        "domain_chains": chains,
    }
    lines = [
        f"{record.ref}  [{record.status}]  {record.kind}" + (f" on {record.base_model}" if record.base_model else ""),
        f"  {record.manifest.description}",
        f"  owner: {record.manifest.owner}   license: {record.manifest.license}   "
        f"quantization: {record.manifest.quantization}   memory: {record.manifest.resources.memory_mb} MiB",
        "  domains: " + "; ".join(" -> ".join(chain) for chain in chains.values()),
        f"  signed by: {record.manifest.signature.team if record.manifest.signature else '(unsigned)'}",
        *(
            [
                f"  OMS bundle: {oms['status']}"
                + (f" with the key of {oms['key']} ({oms['fingerprint']})" if oms.get("fingerprint") else "")
            ]
            if oms
            else []
        ),
        f"  registered {record.created_at:%Y-%m-%d %H:%M:%S} UTC, updated {record.updated_at:%Y-%m-%d %H:%M:%S} UTC",
        "  files:",
        *(f"    {rel}  sha256:{record.manifest.files[rel]}" for rel in blobs),
        f"  example queries: {len(record.manifest.example_queries)}, e.g. {record.manifest.example_queries[0]!r}",
    ]
    if record.manifest.metrics:
        lines.append("  metrics: " + ", ".join(f"{k}={v:g}" for k, v in record.manifest.metrics.items()))
    emit(args, payload, "\n".join(lines))
    return 0


def _status_change(args: argparse.Namespace, change) -> int:
    with _open(args) as reg:
        record = change(reg, *_ref(args.ref))
    emit(args, _summary(record), f"{record.ref} is now {record.status}")
    return 0


def _activate(args: argparse.Namespace) -> int:
    """Activate, teach the router the expert's domain if it does not know it, publish
    (:func:`serve.activation.activate`, as every entry point does); exit 1 when the router step failed."""
    import contextlib
    import sys

    from serve.activation import activate

    with _open(args) as reg, contextlib.redirect_stdout(sys.stderr):  # the router update's progress
        activation = activate(reg, *_ref(args.ref), actor=args.actor, progress=not args.json)
    emit(
        args,
        {
            **_summary(activation.record),
            "router": activation.router_json(),
            "catalog_generation": activation.catalog_generation,
        },
        activation.text(),
    )
    return 1 if activation.router_error is not None else 0


def _retire(args: argparse.Namespace) -> int:
    return _status_change(args, lambda reg, name, version: reg.retire(name, version, actor=args.actor))


def _quarantine(args: argparse.Namespace) -> int:
    return _status_change(args, lambda reg, name, version: reg.quarantine(name, version, args.reason, actor=args.actor))


def _remove(args: argparse.Namespace) -> int:
    from registry.errors import NotFoundError

    name, version = _ref(args.ref)
    if version is None:
        raise NotFoundError(f"{args.ref}: name the version to remove (NAME@VERSION)")
    with _open(args) as reg:
        reg.remove(name, version, actor=args.actor)
    emit(args, {"removed": f"{name}@{version}"}, f"removed {name}@{version}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        check = reg.verify_files(*_ref(args.ref))
    text = (
        f"{check.ref}: all {check.files} files intact"
        if check.ok
        else f"{check.ref}: {len(check.problems)} of {check.files} files bad:\n  " + "\n  ".join(check.problems)
    )
    emit(args, check.model_dump(), text)
    return 0 if check.ok else 1


def _sign(args: argparse.Namespace) -> int:
    from registry.manifest import dump_manifest, load_manifest
    from registry.signing import load_private_key, sign_manifest

    if args.sig_format == "oms":
        return _sign_oms(args)
    if args.files is not None or args.bundle is not None:
        from registry.errors import SignatureError

        raise SignatureError(
            "--files and --bundle are for OMS bundles (--format oms); an ed25519 signature goes into the manifest"
        )
    team = args.team or args.key.stem
    signed = sign_manifest(load_manifest(args.manifest), load_private_key(args.key), team)
    output = args.output or args.manifest
    dump_manifest(signed, output)
    emit(
        args,
        {"manifest": str(output), "team": team, "signature": signed.signature.value},
        f"signed {signed.ref} as team {team!r} -> {output}",
    )
    return 0


def _sign_oms(args: argparse.Namespace) -> int:
    from registry.artifacts import sha256_file
    from registry.errors import ArtifactError, SignatureError
    from registry.manifest import load_manifest
    from registry.oms import MANIFEST_NAMES, check_covers_expert, sign_folder

    if args.output is not None or args.team is not None:
        raise SignatureError("--output and --team are for ed25519 signatures; an OMS bundle goes to --bundle")
    manifest = load_manifest(args.manifest)
    folder = args.files if args.files is not None else args.manifest.parent
    if args.manifest.resolve().parent != folder.resolve() or args.manifest.name not in MANIFEST_NAMES:
        raise SignatureError(
            f"{args.manifest}: an OMS bundle covers the manifest too, so the manifest must be "
            f"{' or '.join(MANIFEST_NAMES)} at the top of the folder it signs ({folder})"
        )
    for relpath, digest in sorted(manifest.files.items()):  # a stale manifest would be signed as it is
        path = folder / relpath
        actual = sha256_file(path) if path.is_file() else "absent"
        if actual != digest:
            raise ArtifactError(
                f"{relpath}: the manifest says sha256 {digest}, the file has {actual}; fix the manifest before signing"
            )
    signed = sign_folder(folder, args.bundle, args.key)
    check_covers_expert(signed, folder, manifest)
    emit(
        args,
        {"bundle": str(signed.bundle), "format": "oms-v1", "fingerprint": signed.fingerprint, "files": signed.files},
        f"signed {manifest.ref}: OMS bundle {signed.bundle} over {len(signed.files)} files (key {signed.fingerprint})",
    )
    return 0


def _schema(args: argparse.Namespace) -> int:
    from registry.manifest import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))
    return 0


def _domains(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        taxonomy = reg.add_domain(args.add, args.parent, actor=args.actor) if args.add else reg.taxonomy
    tree = {vertical: _subtree(taxonomy, vertical) for vertical in taxonomy.verticals()}
    text = "\n".join(f"{vertical}: {_render(children) or '-'}" for vertical, children in tree.items())
    if args.add:
        text = f"domain {args.add} is in the taxonomy (parent: {args.parent or 'none, a vertical'})\n" + text
    emit(args, tree, text)
    return 0


def _subtree(taxonomy, domain: str) -> dict:
    return {child: _subtree(taxonomy, child) for child in taxonomy.children(domain)}


def _render(tree: dict) -> str:
    return ", ".join(f"{name} ({_render(sub)})" if sub else name for name, sub in tree.items())
