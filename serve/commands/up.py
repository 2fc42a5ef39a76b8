"""``mose up``: the README's main command — from a fresh checkout to a running server.

Each step runs only when its result is missing, so the first run is slow (demo experts are
fine-tuned, the router and the calibrator trained) and later runs start the server in well
under a minute:

1. base models: locate the packaged weights, convert SmolLM2 to safetensors once;
2. demo experts: one LoRA expert per vertical of the shared data, registered and activated;
3. router: trained on the shared routing data + the experts' example queries; later runs only
   teach it the domains of newly activated experts;
4. calibrator: the cross-check jury's, trained on a per-source sample of labelled answers;
5. serve on the embedded local Ray (skipped with ``--prepare-only``).

When the calibrator is missing and ``mose up`` goes on to serve, the server starts first and the
calibrator is fitted beside it (about 3 minutes on 2 cores with bf16, up to 8 on a float32 machine): chat
answers come at once, and ``/v1/crosscheck`` answers 503 until the jury's calibrator lands
(``/healthz`` reports ``calibrator_fitting``), then reloads it without a restart.
``--prepare-only`` fits it in line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serve.commands._common import add_common_flags, emit, home_of

CALIBRATION_ROWS_PER_SOURCE = 20
"""Labelled rows per source the jury scores for the first calibrator (100 rows and 51 wrong
answers made from them: about 2 min on 2 cores; `mose crosscheck train --limit N` fits on more)."""

PROBE_ROWS_PER_SOURCE = 200
"""More labelled rows per source for the first calibrator's truthfulness probe alone (1,000 rows
and the 502 wrong answers made from them, only the base model's answer state: about 1.5 min on 2
cores). The probe is the calibrator's candidate: held-out AUROC 0.49 with the probe on the scored
rows alone, 0.585 with these (docs/decisions/jury-truthfulness-probe.md); on every training row
instead of these it reads no better (docs/decisions/jury-probe-candidate.md)."""

START_EVIDENCE_FILE = "start-evidence.jsonl"
"""The jury evidence the first calibrator was fitted on, kept in ``MOSE_HOME/crosscheck/``:
``mose crosscheck train --data ... --limit 20 --probe-rows 200 --seed 0 --evidence <it>`` refits
on the same rows."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "up",
        help="prepare everything mose needs (first run slow, cached after), then serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="prepare the data directory and exit without serving (used on cluster heads)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="shared datasets folder (default: $MOSE_SHARED_DATA or ../shared/data)"
    )
    parser.add_argument("--config", default=None, help="server config YAML for the serve step")
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default 8000)")
    parser.set_defaults(func=run)


def _step(name: str):
    print(f"mose up: {name} ...", file=sys.stderr, flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from experts.base_models import prepare_base_models
    from experts.demo import DemoConfig, build_demo, default_data_dir
    from registry import Registry
    from serve.commands.serve import _load, serve_namespace

    serve_args = serve_namespace(args.home, args.config, args.port)
    if not args.prepare_only:
        _load(serve_args)  # a server config that cannot serve fails now, not after minutes of preparing
    home = home_of(args)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    print(f"mose up: data directory {home.root}, shared data {data_dir}, models on {_precision()}", file=sys.stderr)
    timings: dict[str, float] = {}

    started = _step("base models")
    prepare_base_models(home)
    timings["base_models"] = time.perf_counter() - started

    started = _step("demo experts")
    build_demo(home, DemoConfig(data_dir=data_dir))
    timings["demo_experts"] = time.perf_counter() - started

    with Registry.open(home) as registry:
        started = _step("router")
        router_version = _ensure_router(home, registry, data_dir)
        timings["router"] = time.perf_counter() - started

        calibrator_version = _current_calibrator(home)
        if calibrator_version is None and args.prepare_only:
            started = _step("cross-check calibrator")
            calibrator_version = _ensure_calibrator(home, data_dir)
            timings["calibrator"] = time.perf_counter() - started

        experts = [
            {"name": r.name, "version": r.version, "status": r.status, "domains": r.domains} for r in registry.list()
        ]
    payload = {
        "home": str(home.root),
        "router": router_version,
        "calibrator": calibrator_version,
        "experts": experts,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    calibrator_text = calibrator_version or "fitted once the server answers"
    lines = [
        f"mose is ready in {home.root} (router {router_version}, calibrator {calibrator_text})",
        f"{len(experts)} expert(s) registered:",
    ]
    lines += [f"  {e['name']}@{e['version']}  [{e['status']}]  {', '.join(e['domains'])}" for e in experts]
    emit(args, payload, "\n".join(lines))
    if args.prepare_only:
        return 0
    from serve.commands.serve import run_serve

    if calibrator_version is not None:
        return run_serve(serve_args)
    try:
        return run_serve(serve_args, background=lambda: _fit_calibrator_beside_server(home, data_dir))
    finally:
        _clear_fitting(home)  # stopped part-way: the next `mose up` fits it again


def _current_calibrator(home) -> str | None:
    from jury.calibrator import load_calibrator
    from registry.errors import MoseError

    try:
        return load_calibrator(home.crosscheck_dir).version
    except MoseError:
        return None


def _fit_calibrator_beside_server(home, data_dir: Path) -> None:
    """Fit the first calibrator while the server runs; the jury deployment refuses verdicts with
    a 503 while the fitting record exists and reloads the calibrator once it is saved."""
    from jury.calibrator import mark_fitting

    mark_fitting(home.crosscheck_dir)
    started = _step("cross-check calibrator (the server answers chat meanwhile; /v1/crosscheck from when it is fitted)")
    try:
        version = _ensure_calibrator(home, data_dir)
        print(
            f"mose up: calibrator {version} fitted in {time.perf_counter() - started:.0f} s; /v1/crosscheck is on",
            file=sys.stderr,
            flush=True,
        )
    except Exception as exc:  # the server keeps serving chat: say what to run instead
        print(
            f"mose up: WARNING: fitting the cross-check calibrator failed ({exc}); verdicts stay "
            "uncalibrated until `mose crosscheck train --data ../shared/data/crosscheck_dev.jsonl` fits one",
            file=sys.stderr,
            flush=True,
        )
    finally:
        _clear_fitting(home)


def _clear_fitting(home) -> None:
    from jury.calibrator import clear_fitting

    clear_fitting(home.crosscheck_dir)


def _ensure_router(home, registry, data_dir: Path) -> str:
    """Train the router when there is none; otherwise teach it newly activated experts' domains
    and publish, as every activation does (:func:`serve.activation.teach_router`)."""
    from registry.errors import MoseError
    from router_model.artifact import current_dir
    from router_model.service import train_and_publish
    from serve.activation import teach_router

    try:
        current_dir(home.router_dir)
    except MoseError:
        return train_and_publish(home, [data_dir / "routing_dev.jsonl"], registry).name
    return teach_router(home, registry, actor="mose-up", progress=True).version


def _ensure_calibrator(home, data_dir: Path) -> str:
    """Train the cross-check calibrator once, on a per-source sample of the train bucket."""
    from jury.calibrator import CalibratorConfig, save_calibrator
    from jury.crosscheck import collect, load_rows, open_jury, save_evidence, train, training_sample

    current = _current_calibrator(home)
    if current is not None:
        return current
    rows, probe_rows = training_sample(
        load_rows(data_dir / "crosscheck_dev.jsonl"), CALIBRATION_ROWS_PER_SOURCE, PROBE_ROWS_PER_SOURCE, seed=0
    )
    jury = open_jury(home)
    evidence = collect(jury, rows, state_layer=CalibratorConfig().probe_layer)
    calibrator = train(jury, rows, evidence=evidence, probe_rows=probe_rows)
    save_calibrator(calibrator, home.crosscheck_dir)
    # Scoring is most of this step; keeping the evidence lets `mose crosscheck train --evidence`
    # refit on exactly these rows without scoring them again.
    save_evidence(evidence, home.crosscheck_dir / START_EVIDENCE_FILE)
    return calibrator.version


def _precision() -> str:
    """Where models run on this machine and at which precision, by DevicePolicy's defaults (what
    preparing uses; a server config's ``pool.cpu_dtype`` can set its replicas otherwise)."""
    from experts.policy import DevicePolicy

    policy = DevicePolicy()
    device = policy.resolve_device()
    return f"{device} in {policy.compute_dtype(device)}"
