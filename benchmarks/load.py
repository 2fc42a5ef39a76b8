"""Load benchmark: many concurrent clients, mixed traffic; the server answers or says "later".

Run (after ``mose up --prepare-only``, so the demo experts and router exist):

    .venv/bin/python benchmarks/load.py [--home .mose] [--clients 32] [--seconds 120] [--json FILE]
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 ...   # a server already running
    .venv/bin/python benchmarks/load.py --queue-limit 16                  # overload: see the 429s

N clients send, back to back, a mix of chat completions (``model: auto`` and named experts,
small ``max_tokens``), ``/v1/route`` and ``/v1/crosscheck`` calls for T seconds (and at most
``--max-requests`` in all), on loopback only. A client told 429/503 with ``Retry-After`` waits
that long, as a polite client does. Reported: requests sent, answered (2xx), rejected (429/503
with ``Retry-After``), errors (anything else, timeouts included: must be 0), p50/p99 latency of
answered requests, and the RSS of the server's whole process tree (Ray workers included) at
minute 1 and at the end. Exit status 1 when errors > 0 or RSS grew by 10 % or more.

``run_load`` is the reusable core (``tests/integration/test_serve_load.py`` runs a short version).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._report import tree_rss_mib, write_json  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REJECTED = {429, 503}
MAX_GROWTH_PCT = 10.0
PROMPTS = [
    "What are the symptoms of type 2 diabetes?",
    "Solve for x: 3x + 5 = 20.",
    "What is a fiduciary duty?",
    "How does compound interest work?",
    "Write a Python function that reverses a string.",
    "What causes high blood pressure?",
    "What is the derivative of x^2 + 3x?",
    "What is inflation?",
]
ANSWERS = ["Fatigue and thirst.", "x = 5", "A duty to act in another's interest.", "Interest on interest."]


@dataclass
class Tally:
    """What the clients saw; latencies only of answered requests."""

    sent: int = 0
    answered: int = 0
    rejected: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


def check_loopback(url: str) -> None:
    """The generator never leaves this machine."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {url}: only loopback addresses ({sorted(LOOPBACK)}) are allowed")


def request_for(i: int, experts: list[str], max_tokens: int) -> tuple[str, str, dict]:
    """The i-th request of the mix: 4 in 10 chat auto, 3 named experts, 2 route, 1 crosscheck."""
    prompt = PROMPTS[i % len(PROMPTS)]
    slot = i % 10
    if slot < 7:
        model = "auto" if slot < 4 else experts[i % len(experts)]
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        }
        return ("chat-auto" if model == "auto" else "chat-named"), "/v1/chat/completions", body
    if slot < 9:
        return "route", "/v1/route", {"query": prompt}
    return "crosscheck", "/v1/crosscheck", {"question": prompt, "answer": ANSWERS[i % len(ANSWERS)]}


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def one_request(client: httpx.AsyncClient, tally: Tally, i: int, experts: list[str], max_tokens: int) -> float:
    """Send request i; returns how long the client should wait before its next one."""
    kind, path, body = request_for(i, experts, max_tokens)
    tally.sent += 1
    tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1
    started = time.perf_counter()
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        tally.error(f"{kind}: {type(exc).__name__} after {time.perf_counter() - started:.1f}s")
        return 0.0
    tally.statuses[str(response.status_code)] = tally.statuses.get(str(response.status_code), 0) + 1
    if response.is_success:
        tally.answered += 1
        tally.latencies.append(time.perf_counter() - started)
        return 0.0
    wait = retry_after(response)
    if response.status_code in REJECTED and wait is not None:
        tally.rejected += 1
        return wait
    tally.error(f"{kind}: {response.status_code} {response.text[:200]}")
    return 0.0


async def client_loop(
    url: str,
    tally: Tally,
    start: int,
    step: int,
    deadline: float,
    max_requests: int,
    experts: list[str],
    max_tokens: int,
    timeout_s: float,
) -> None:
    i = start
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        while time.monotonic() < deadline and tally.sent < max_requests:
            wait = await one_request(client, tally, i, experts, max_tokens)
            i += step
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))


async def sample_rss(pid: int, mark_s: float, marks: dict[str, float]) -> None:
    await asyncio.sleep(mark_s)
    marks["rss_mark_mb"] = tree_rss_mib(pid)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_load_async(
    url: str,
    clients: int,
    seconds: float,
    experts: list[str],
    max_requests: int = 100_000,
    max_tokens: int = 8,
    timeout_s: float = 120.0,
    server_pid: int | None = None,
    rss_mark_s: float = 60.0,
) -> dict:
    check_loopback(url)
    tally, marks = Tally(), {}
    started = time.monotonic()
    deadline = started + seconds
    sampler = asyncio.create_task(sample_rss(server_pid, rss_mark_s, marks)) if server_pid else None
    await asyncio.gather(
        *(
            client_loop(url, tally, c, clients, deadline, max_requests, experts, max_tokens, timeout_s)
            for c in range(clients)
        )
    )
    if sampler is not None:
        sampler.cancel()
        marks["rss_end_mb"] = tree_rss_mib(server_pid)
    return summarize(tally, clients, time.monotonic() - started, marks)


def run_load(url: str, clients: int, seconds: float, experts: list[str], **options) -> dict:
    """Drive the server at ``url``; returns the report (see :func:`summarize`)."""
    return asyncio.run(run_load_async(url, clients, seconds, experts, **options))


def summarize(tally: Tally, clients: int, elapsed: float, marks: dict[str, float]) -> dict:
    p50, p99 = percentile(tally.latencies, 0.5), percentile(tally.latencies, 0.99)
    start_mb, end_mb = marks.get("rss_mark_mb"), marks.get("rss_end_mb")
    growth = (end_mb - start_mb) / start_mb * 100 if start_mb and end_mb else None
    report = {k: v for k, v in asdict(tally).items() if k != "latencies"}
    return report | {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "answered_per_s": round(tally.answered / elapsed, 2),
        "p50_s": p50 and round(p50, 3),
        "p99_s": p99 and round(p99, 3),
        "rss_minute1_mb": start_mb and round(start_mb, 1),
        "rss_end_mb": end_mb and round(end_mb, 1),
        "rss_growth_pct": growth if growth is None else round(growth, 2),
    }


def failed(report: dict) -> list[str]:
    """Why the run fails the bar (empty when it passes)."""
    reasons = [f"{report['errors']} errors: {report['error_samples']}"] if report["errors"] else []
    if report["rss_growth_pct"] is not None and report["rss_growth_pct"] >= MAX_GROWTH_PCT:
        reasons.append(f"RSS grew {report['rss_growth_pct']:.1f}% (limit {MAX_GROWTH_PCT:.0f}%)")
    if not report["answered"]:
        reasons.append("nothing was answered")
    return reasons


def print_table(report: dict) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} MiB"

    rows = [
        ("clients x duration", f"{report['clients']} x {report['seconds']:.0f} s"),
        ("requests sent", str(report["sent"])),
        ("answered (2xx)", f"{report['answered']} ({report['answered_per_s']:.2f}/s)"),
        ("rejected (429/503 + Retry-After)", str(report["rejected"])),
        ("errors (anything else)", str(report["errors"])),
        ("latency p50 / p99 (answered)", f"{ms(report['p50_s'])} / {ms(report['p99_s'])}"),
        ("server RSS at minute 1 / end", f"{mb(report['rss_minute1_mb'])} / {mb(report['rss_end_mb'])}"),
        ("RSS growth", "-" if report["rss_growth_pct"] is None else f"{report['rss_growth_pct']:+.1f} %"),
        ("mix sent", ", ".join(f"{k} {v}" for k, v in sorted(report["by_kind"].items()))),
        ("status codes", ", ".join(f"{k}: {v}" for k, v in sorted(report["statuses"].items()))),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':{width}} | value")
    print(f"{'-' * width}-+------")
    for name, value in rows:
        print(f"{name:{width}} | {value}")
    for sample in report["error_samples"]:
        print(f"error: {sample}")


def active_experts(home_root: str) -> list[str]:
    from registry import Registry
    from registry.home import MoseHome

    with Registry.open(MoseHome.from_env(home_root)) as reg:
        return [r.name for r in reg.list(status="active")] or ["base"]


def served_by_us(args: argparse.Namespace, experts: list[str]) -> dict:
    """Start ``mose serve`` on a free port, wait for it, run the load, stop it."""
    from tests._fixtures.serve import free_port, start_server, stop_server

    port = free_port()
    log = Path(args.home) / "bench-load.log"
    env = {"MOSE_SERVE__LIMITS__MAX_QUEUED_REQUESTS": str(args.queue_limit)} if args.queue_limit else None
    proc = start_server(Path(args.home), port, log, extra_env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        return run_load(
            url,
            args.clients,
            args.seconds,
            experts,
            max_requests=args.max_requests,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            server_pid=proc.pid,
        )
    finally:
        stop_server(proc)


def wait_healthy(url: str, proc, log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mose serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"mose serve was not healthy after {timeout_s:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOSE_HOME", str(REPO_ROOT / ".mose")))
    parser.add_argument("--url", default=None, help="load a server already running here (loopback only)")
    parser.add_argument("--server-pid", type=int, default=None, help="with --url: the server's PID, for RSS")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (an error)")
    parser.add_argument(
        "--queue-limit",
        type=int,
        default=None,
        help="admission limit of the server this script starts (limits.max_queued_requests)",
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()

    experts = [e for e in active_experts(args.home) if e != "base"] or ["base"]
    if args.url:
        report = run_load(
            args.url,
            args.clients,
            args.seconds,
            experts,
            max_requests=args.max_requests,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            server_pid=args.server_pid,
        )
    else:
        report = served_by_us(args, experts)
    reasons = failed(report)
    print_table(report)
    for reason in reasons:
        print(f"FAIL: {reason}", file=sys.stderr)
    write_json(args.json, report | {"ok": not reasons, "failures": reasons})
    return 1 if reasons else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
