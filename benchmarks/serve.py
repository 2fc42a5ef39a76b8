"""Serving benchmark: what the HTTP layer and Ray Serve cost on top of the expert pool.

Run (after ``mose up --prepare-only``, so the demo experts and router exist):

    .venv/bin/python benchmarks/serve.py [--home .mose] [--requests 24] [--clients 16] [--json FILE]

In one run, on the same short prompts, greedy, 16 new tokens:
  (a) in-process: the router and ``ExpertPool.generate``, one request at a time;
  (b) HTTP: ``POST /v1/chat/completions`` with ``model: auto`` (routing included) on a
      ``mose serve`` started by this script; overhead ratio b/a (target <= 1.15);
  throughput with N concurrent clients over mixed named experts vs one client (requests/s,
  tokens/s, average batch size from /metrics); time from ``mose serve`` to first answer for a
  first start and an immediate restart; RSS of the whole application (server process tree).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks._report import tree_rss_mib, write_json  # noqa: E402
from tests._fixtures.serve import free_port, start_server, stop_server  # noqa: E402

PROMPTS = [
    "What are the symptoms of type 2 diabetes?",
    "Solve for x: 3x + 5 = 20.",
    "What is a fiduciary duty?",
    "How does compound interest work?",
    "Write a Python function that reverses a string.",
    "What is the boiling point of water at sea level?",
    "Who wrote Pride and Prejudice?",
    "What is inflation?",
]
NEW_TOKENS = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class InProcess:
    """(a): the same router and pool in this process, no Ray, no HTTP."""

    def __init__(self, home) -> None:
        from experts.pool import ExpertPool
        from experts.types import GenerationRequest, SamplingParams
        from registry import Registry
        from router_model.runtime import load_router

        self.request_type = GenerationRequest
        self.registry = Registry.open(home)
        self.pool = ExpertPool.from_registry(self.registry, home=home)
        self.router = load_router(home, self.registry, strict=False)  # same expert per prompt as HTTP `auto`
        self.params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
        self.answer("hi")

    def answer(self, prompt: str) -> float:
        started = time.perf_counter()
        request = self.request_type(expert=self.router.route(prompt).expert,
                                    messages=[{"role": "user", "content": prompt}], params=self.params)
        self.pool.generate([request])
        return time.perf_counter() - started


def chat(client: httpx.Client, prompt: str, model: str = "auto") -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": NEW_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}]})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]


def time_to_first_answer(home: Path, log: Path) -> tuple[float, subprocess.Popen, str]:
    port = free_port()
    started = time.perf_counter()
    proc = start_server(home, port, log)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"mose serve exited:\n{log.read_text()[-3000:]}")
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                chat(client, PROMPTS[0])
            return time.perf_counter() - started, proc, url
        except httpx.HTTPError:
            time.sleep(0.5)


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("mose_expert_batch_size_")}
    return values.get("mose_expert_batch_size_sum", 0.0), values.get("mose_expert_batch_size_count", 0.0)


def throughput(url: str, clients: int, requests: int, experts: list[str]) -> dict[str, float]:
    before_sum, before_count = batch_stats(url)

    def one(i: int) -> int:
        with httpx.Client(base_url=url, timeout=300) as client:
            return chat(client, PROMPTS[i % len(PROMPTS)], experts[i % len(experts)])[1]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as executor:
        tokens = sum(executor.map(one, range(requests)))
    seconds = time.perf_counter() - started
    after_sum, after_count = batch_stats(url)
    batches = max(after_count - before_count, 1)
    return {"rps": requests / seconds, "tps": tokens / seconds, "batch": (after_sum - before_sum) / batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOSE_HOME", str(REPO_ROOT / ".mose")))
    parser.add_argument("--requests", type=int, default=24, help="requests per latency series")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for throughput")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from registry import Registry
    from registry.home import MoseHome

    home = MoseHome.from_env(args.home)
    with Registry.open(home) as reg:
        experts = [r.name for r in reg.list(status="active")] or ["base"]
    print(f"home {home.root}: {len(experts)} active experts; {psutil.cpu_count()} CPUs", file=sys.stderr)

    direct_pool = InProcess(home)
    log = Path(home.root) / "bench-serve.log"
    cold, proc, url = time_to_first_answer(home.root, log)
    try:
        # (a) and (b) alternate, prompt by prompt, so both series see the same machine: on two
        # shared cores, series taken minutes apart differed by 20 % on their own.
        direct, http = [], []
        with httpx.Client(base_url=url, timeout=300) as client:
            for i in range(args.requests):
                direct.append(direct_pool.answer(PROMPTS[i % len(PROMPTS)]))
                http.append(chat(client, PROMPTS[i % len(PROMPTS)])[0])
        del direct_pool
        single = throughput(url, 1, args.requests, experts)
        many = throughput(url, args.clients, max(args.requests, 2 * args.clients), experts)
        rss = tree_rss_mib(proc.pid)
    finally:
        stop_server(proc)
    warm, proc, _ = time_to_first_answer(home.root, log)
    stop_server(proc)

    a50, a99 = statistics.median(direct), percentile(direct, 0.99)
    b50, b99 = statistics.median(http), percentile(http, 0.99)
    rows = [
        ("latency p50, in-process pool (a)", f"{a50 * 1000:.0f} ms", ""),
        ("latency p50, HTTP auto-routed (b)", f"{b50 * 1000:.0f} ms", ""),
        ("overhead ratio b/a (p50)", f"{b50 / a50:.2f}", "target <= 1.15"),
        ("latency p99 a / b", f"{a99 * 1000:.0f} / {b99 * 1000:.0f} ms", ""),
        ("throughput, 1 client", f"{single['rps']:.2f} req/s, {single['tps']:.1f} tok/s",
         f"avg batch {single['batch']:.2f}"),
        (f"throughput, {args.clients} clients, mixed experts", f"{many['rps']:.2f} req/s, {many['tps']:.1f} tok/s",
         f"avg batch {many['batch']:.2f}; x{many['rps'] / single['rps']:.2f} vs 1 client"),
        ("mose serve -> first answer, first start", f"{cold:.1f} s", ""),
        ("mose serve -> first answer, restart", f"{warm:.1f} s", ""),
        ("RSS of the application (all processes)", f"{rss:.0f} MiB", f"{len(experts)} experts loaded"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':{width}} | {'mose':28} | note")
    print(f"{'-' * width}-+-{'-' * 28}-+-----")
    for name, value, note in rows:
        print(f"{name:{width}} | {value:28} | {note}")
    write_json(args.json, {"experts": len(experts), "clients": args.clients, "requests": args.requests,
                           "in_process_s": {"p50": a50, "p99": a99}, "http_auto_s": {"p50": b50, "p99": b99},
                           "overhead_ratio_p50": b50 / a50, "one_client": single, "many_clients": many,
                           "first_answer_s": {"first_start": cold, "restart": warm}, "rss_mib": rss})


if __name__ == "__main__":
    main()
