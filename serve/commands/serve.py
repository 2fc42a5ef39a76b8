"""``mose serve``: run the application; ``mose serve build``: write a Ray Serve config for a cluster."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

from serve.commands._common import add_common_flags
from serve.commands._config_args import add_config_arguments, overrides_from_args
from serve.config import ServeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API on Ray Serve (embedded local Ray by default)",
        description="Start Ray (embedded, or join --address), deploy the mose application, print its "
        "URL and serve until SIGINT/SIGTERM. Settings come from --config (YAML), then MOSE_SERVE__* "
        "environment variables, then these flags.",
    )
    _add_config_flags(parser)
    add_config_arguments(parser, ServeConfig, ("http.host", "http.port"))
    parser.set_defaults(func=run_serve)
    actions = parser.add_subparsers(dest="serve_action", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="print a Ray Serve config (YAML) for `serve deploy` on a cluster",
        description="Print a Ray Serve config that `serve deploy` accepts. Secrets are not written: "
        "set MOSE_ADMIN_TOKEN in the cluster nodes' environment.",
    )
    _add_config_flags(build)
    build.set_defaults(func=run_build)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser, json_flag=False)
    parser.add_argument("--config", default=None, help="server config YAML (see docs/operations.md)")
    add_config_arguments(parser, ServeConfig, ("ray.address",))


def _load(args: argparse.Namespace):
    from serve.config import load_config

    return load_config(args.config, home=args.home, **overrides_from_args(ServeConfig, args))


def serve_namespace(home: str | None, config: str | None, port: int | None = None) -> argparse.Namespace:
    """What ``mose serve [--home H] [--config C] [--port P]`` parses to (``mose up`` starts the server)."""
    parser = argparse.ArgumentParser(prog="mose", add_help=False)
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["serve"]
    for flag, value in (("--home", home), ("--config", config), ("--port", port)):
        if value is not None:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def announce_admin(config) -> None:
    """Say how the admin endpoints are guarded; insecure_local gets a warning nobody can miss."""
    mode = config.auth.admin_mode
    if mode == "insecure":
        url = f"http://{config.http.host}:{config.http.port}"
        for line in (
            "WARNING: INSECURE LOCAL MODE (auth.insecure_local): the admin endpoints",
            f"WARNING: (register, activate, retire) are open WITHOUT A TOKEN on {url};",
            "WARNING: anyone who can reach that port can change the registry. Set MOSE_ADMIN_TOKEN instead.",
        ):
            print(f"mose: {line}", file=sys.stderr)
    elif mode == "off":
        print("mose: admin endpoints are off (set MOSE_ADMIN_TOKEN to register experts over HTTP)", file=sys.stderr)
    else:
        print("mose: admin endpoints need 'Authorization: Bearer $MOSE_ADMIN_TOKEN'", file=sys.stderr)


def run_serve(args: argparse.Namespace, background: Callable[[], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; ``background`` (e.g. fitting what the server can do without at
    first) runs in a daemon thread once the server answers."""
    from serve import app

    config = _load(args)  # an invalid config (e.g. admin on without a token) stops here, before Ray
    announce_admin(config)
    stop = threading.Event()
    print("mose: starting Ray Serve ...", file=sys.stderr)
    try:
        url = app.start(config)
        # After ray.init: Ray installs its own SIGTERM handler, which aborts the process.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"mose: serving on {url}  (OpenAI base URL: {url}/v1; Ctrl-C to stop)", flush=True)
        if background is not None:
            threading.Thread(target=background, name="mose-background", daemon=True).start()
        stop.wait()
    finally:
        print("mose: shutting down", file=sys.stderr)
        app.stop()
    return 0


def run_build(args: argparse.Namespace) -> int:
    import yaml

    from serve.app import serve_build_config

    sys.stdout.write(yaml.safe_dump(serve_build_config(args.config, args.home), sort_keys=False))
    return 0
