"""Serving benchmark: what the HTTP layer and Ray Serve cost on top of the expert pool.

Run (after ``mose up --prepare-only``, so the demo experts and router exist):

    .venv/bin/python benchmarks/serve.py [--home .mose] [--requests 24] [--clients 1,4,16] [--json FILE]

In one run, on the same short prompts, greedy, ``--max-tokens`` new tokens (default 16):
  (a) in-process: the router and ``ExpertPool.generate``, one request at a time;
  (b) HTTP: ``POST /v1/chat/completions`` with ``model: auto`` (routing included) on a
      ``mose serve`` started by this script; overhead ratio b/a (target <= 1.15);
  served throughput over HTTP with 1, 4 and 16 concurrent closed-loop clients over mixed named
  experts (requests/s, tokens/s, average batch size from /metrics), each level twice: all
  non-streaming, and streaming and non-streaming 1:1 (target: >= 90 % of all non-streaming), with
  p50/p99 time to first token and inter-token latency of the streamed requests (SSE chunks); at
  the most clients also the same requests all on one expert (the mixed-expert penalty); time from
  ``mose serve`` to first answer for a first start and an immediate restart; RSS of the whole
  application (server process tree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
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

from benchmarks._report import MIXED_DOMAIN_PROMPTS as PROMPTS  # noqa: E402
from benchmarks._report import print_table, tree_rss_mib, write_json  # noqa: E402
from tests._fixtures.serve import free_port, start_server, stop_server  # noqa: E402

NEW_TOKENS = 16  # --max-tokens


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
        request = self.request_type(
            expert=self.router.route(prompt).expert, messages=[{"role": "user", "content": prompt}], params=self.params
        )
        self.pool.generate([request])
        return time.perf_counter() - started


def chat(client: httpx.Client, prompt: str, model: str = "auto") -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        },
    )
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


def chat_stream(client: httpx.Client, prompt: str, model: str) -> tuple[int, list[float], float]:
    """One streamed chat: (completion tokens, arrival times of the content chunks, start time).
    Tokens from the final usage chunk (``stream_options.include_usage``), else one per chunk."""
    started = time.perf_counter()
    times, usage = [], None
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": model,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}],
        },
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                times.append(time.perf_counter())
    return (usage if usage is not None else len(times)), times, started


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("mose_expert_batch_size_")
    }
    return values.get("mose_expert_batch_size_sum", 0.0), values.get("mose_expert_batch_size_count", 0.0)


def throughput(url: str, clients: int, requests: int, experts: list[str], streamed_share: int = 0) -> dict:
    """``clients`` closed-loop clients send ``requests`` chats, expert i % len(experts) for the i-th;
    with ``streamed_share`` N, every N-th request streams (2: streaming and non-streaming 1:1)."""
    before_sum, before_count = batch_stats(url)
    ttft, itl = [], []
    lock = threading.Lock()

    def one(i: int) -> int:
        prompt, model = PROMPTS[i % len(PROMPTS)], experts[i % len(experts)]
        with httpx.Client(base_url=url, timeout=300) as client:
            if not streamed_share or i % streamed_share != 1 % streamed_share:
                return chat(client, prompt, model)[1]
            tokens, times, started = chat_stream(client, prompt, model)
        with lock:
            if times:
                ttft.append(times[0] - started)
                itl.extend(b - a for a, b in zip(times, times[1:]))
        return tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as executor:
        tokens = sum(executor.map(one, range(requests)))
    seconds = time.perf_counter() - started
    after_sum, after_count = batch_stats(url)
    batches = max(after_count - before_count, 1)
    figures = {
        "clients": clients,
        "requests": requests,
        "tokens": tokens,
        "seconds": seconds,
        "rps": requests / seconds,
        "tps": tokens / seconds,
        "batch": (after_sum - before_sum) / batches,
    }
    if streamed_share:
        figures["ttft_s"] = {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99)} if ttft else None
        figures["itl_s"] = {"p50": percentile(itl, 0.5), "p99": percentile(itl, 0.99)} if itl else None
    return figures


def main() -> None:
    global NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOSE_HOME", str(REPO_ROOT / ".mose")))
    parser.add_argument("--requests", type=int, default=24, help="requests per latency series")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--max-tokens", type=int, default=NEW_TOKENS, help="new tokens per request")
    parser.add_argument("--no-restart", action="store_true", help="skip the restart time (one server start)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    NEW_TOKENS = args.max_tokens
    levels = [int(x) for x in str(args.clients).split(",") if x.strip()]

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
        series = {}
        for level in levels:
            count = max(args.requests, 2 * level)
            series[level] = {
                "non_streaming": throughput(url, level, count, experts),
                "mixed_1_1": throughput(url, level, count, experts, streamed_share=2),
            }
            print(f"{level} clients done", file=sys.stderr)
        top = max(levels)
        one_expert = throughput(url, top, max(args.requests, 2 * top), experts[:1])
        rss = tree_rss_mib(proc.pid)
    finally:
        stop_server(proc)
    warm = None
    if not args.no_restart:
        warm, proc, _ = time_to_first_answer(home.root, log)
        stop_server(proc)

    a50, a99 = statistics.median(direct), percentile(direct, 0.99)
    b50, b99 = statistics.median(http), percentile(http, 0.99)
    rows = [
        ("latency p50, in-process pool (a)", f"{a50 * 1000:.0f} ms", ""),
        ("latency p50, HTTP auto-routed (b)", f"{b50 * 1000:.0f} ms", ""),
        ("overhead ratio b/a (p50)", f"{b50 / a50:.2f}", "target <= 1.15"),
        ("latency p99 a / b", f"{a99 * 1000:.0f} / {b99 * 1000:.0f} ms", ""),
    ]
    single = series[min(levels)]["non_streaming"]
    for level in levels:
        plain, mixed = series[level]["non_streaming"], series[level]["mixed_1_1"]
        mixed["share_of_non_streaming"] = mixed["tps"] / plain["tps"]
        label = f"{level} client{'' if level == 1 else 's'}"
        rows.append(
            (
                f"throughput, {label}, mixed experts",
                f"{plain['rps']:.2f} req/s, {plain['tps']:.1f} tok/s",
                f"avg batch {plain['batch']:.2f}; x{plain['tps'] / single['tps']:.2f} vs {min(levels)} "
                f"client{'' if min(levels) == 1 else 's'}",
            )
        )
        rows.append(
            (
                f"throughput, {label}, streaming + non-streaming 1:1",
                f"{mixed['tps']:.1f} tok/s",
                f"{mixed['share_of_non_streaming']:.0%} of all non-streaming (target >= 90 %)",
            )
        )
        ttft, itl = mixed.get("ttft_s"), mixed.get("itl_s")
        rows.append(
            (
                f"TTFT / ITL p50, {label}, streamed",
                f"{ttft['p50'] * 1000:.0f} / {itl['p50'] * 1000:.0f} ms" if ttft and itl else "—",
                f"p99 {ttft['p99'] * 1000:.0f} / {itl['p99'] * 1000:.0f} ms" if ttft and itl else "",
            )
        )
    top_plain = series[top]["non_streaming"]
    penalty = 1 - top_plain["tps"] / one_expert["tps"]
    rows += [
        (
            f"throughput, {top} clients, one expert",
            f"{one_expert['rps']:.2f} req/s, {one_expert['tps']:.1f} tok/s",
            f"mixed-expert penalty {penalty:.1%} (target <= 20 %)",
        ),
        ("mose serve -> first answer, first start", f"{cold:.1f} s", ""),
        ("mose serve -> first answer, restart", f"{warm:.1f} s" if warm is not None else "—", ""),
        ("RSS of the application (all processes)", f"{rss:.0f} MiB", f"{len(experts)} experts loaded"),
    ]
    print_table(f"Serving over HTTP, {NEW_TOKENS} new tokens, greedy, {len(experts)} experts", rows)
    write_json(
        args.json,
        {
            "experts": len(experts),
            "clients": levels,
            "requests": args.requests,
            "max_tokens": NEW_TOKENS,
            "in_process_s": {"p50": a50, "p99": a99},
            "http_auto_s": {"p50": b50, "p99": b99},
            "overhead_ratio_p50": b50 / a50,
            "series": series,
            "one_expert": one_expert,
            "one_expert_penalty": penalty,
            "first_answer_s": {"first_start": cold, "restart": warm},
            "rss_mib": rss,
        },
    )


if __name__ == "__main__":
    main()
