"""Decoding benchmark: the pool's engine loop in process, beside Hugging Face ``generate`` (and llama.cpp).

    .venv/bin/python benchmarks/decode.py [--adapters 8] [--new-tokens 32] [--concurrency 1,4,16] [--json FILE]

On the same chat prompts, greedy, ``--new-tokens`` new tokens each (fewer when a row hits EOS;
tokens are counted as decoded):

* engine, mixed adapters: N closed-loop clients (N = 1, 4, 16), each streaming one request at a
  time through ``ExpertPool.stream`` with the next adapter in turn (``--adapters`` random LoRA
  adapters shaped like the demo experts: rank 8, the 7 linear layers of the last 10 decoder
  layers). tokens/s over the wall time; time to first token (submit -> first text piece) and
  inter-token latency (gap between text pieces) as p50/p99 over every request / gap;
* engine, one adapter: the same requests all on the first adapter; the mixed-adapter penalty is
  1 - mixed/single tokens/s at the same concurrency;
* Hugging Face ``generate`` on the same peft model and adapters (``adapter_names``, peft's
  mixed-adapter batches): static batches of N requests, mixed and one adapter;
* llama.cpp (``llama-cpp-python`` on the packaged SmolLM2 GGUF, base model, one request at a
  time), when that package imports;
* the compute bound: a torch matmul's GFLOP/s on this machine (threads and dtype of the pool)
  divided by 2 x the base model's parameters (FLOPs per decoded token), in tokens/s.

Threads and precision are the pool's defaults ($MOSE_CPU_THREADS, $MOSE_CPU_DTYPE).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks._report import MIXED_DOMAIN_PROMPTS as PROMPTS  # noqa: E402
from benchmarks._report import print_table, write_json  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def requests_for(level: int, minimum: int) -> int:
    """Requests per series: two per client, at least ``minimum``."""
    return max(2 * level, minimum)


# ---------------------------------------------------------------- the compute bound


def matmul_gflops(dtype, size: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of a square torch matmul in ``dtype`` with torch's current thread count."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


# ---------------------------------------------------------------- the engine


def engine_series(pool, adapters: list[str], level: int, count: int, new_tokens: int) -> dict:
    """``level`` closed-loop clients streaming ``count`` requests through the engine loop."""
    from experts.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    counter = iter(range(count))
    lock = threading.Lock()
    ttft, itl, tokens, batches = [], [], [], []

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            request = GenerationRequest(
                expert=adapters[i % len(adapters)],
                params=params,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            )
            started = time.perf_counter()
            handle = pool.stream(request)
            times = []
            for _ in handle:
                times.append(time.perf_counter())
            result = handle.result()
            with lock:
                if times:
                    ttft.append(times[0] - started)
                    itl.extend(b - a for a, b in zip(times, times[1:]))
                tokens.append(result.completion_tokens)
                batches.append(handle.batch_size)

    steps_before = pool.engine.stats()["steps"]
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(level)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    steps = pool.engine.stats()["steps"] - steps_before
    return {
        "clients": level,
        "requests": count,
        "tokens": sum(tokens),
        "seconds": seconds,
        "tps": sum(tokens) / seconds,
        "steps": steps,
        "tokens_per_step": sum(tokens) / max(steps, 1),
        "max_batch": max(batches, default=0),
        "ttft_s": {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99)},
        "itl_s": {"p50": percentile(itl, 0.5), "p99": percentile(itl, 0.99)},
    }


# ---------------------------------------------------------------- Hugging Face generate


def hf_series(pool, keys: list[str], level: int, count: int, new_tokens: int) -> dict:
    """Static batches of ``level`` requests through peft's ``generate`` with per-row adapters."""
    import torch

    from experts.chat import left_pad, prompt_ids

    model, tokenizer = pool._shared_model(), pool.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = {
        tokenizer.eos_token_id,
        *(
            model.generation_config.eos_token_id
            if isinstance(model.generation_config.eos_token_id, list)
            else [model.generation_config.eos_token_id]
        ),
    } - {None}
    total, started = 0, time.perf_counter()
    with pool._lock, torch.inference_mode():  # the engine loop is idle; keep it so
        for start in range(0, count, level):
            rows = list(range(start, min(start + level, count)))
            prompts = [prompt_ids(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in rows]
            ids, mask, _ = left_pad(prompts, pad)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                adapter_names=[keys[i % len(keys)] for i in rows],
            )
            for row in out[:, ids.shape[1] :].tolist():
                produced = 0
                for token in row:
                    produced += 1
                    if token in eos:
                        break
                total += produced
    seconds = time.perf_counter() - started
    return {"clients": level, "requests": count, "tokens": total, "seconds": seconds, "tps": total / seconds}


# ---------------------------------------------------------------- llama.cpp


def llama_cpp_series(count: int, new_tokens: int, threads: int) -> dict | str:
    """The packaged GGUF through llama-cpp-python, one request at a time; a reason when unavailable."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return f"llama-cpp-python not installed ({exc})"
    from experts.base_models import smollm2_gguf_path

    llm = Llama(model_path=str(smollm2_gguf_path()), n_ctx=1024, n_threads=threads, verbose=False)
    total, started = 0, time.perf_counter()
    for i in range(count):
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=new_tokens, temperature=0.0
        )
        total += out["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    return {"clients": 1, "requests": count, "tokens": total, "seconds": seconds, "tps": total / seconds}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=8, help="random demo-shaped LoRA adapters (mixed series)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--min-requests", type=int, default=4, help="requests per series: max(2 x clients, this)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate peer")
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp peer")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    import torch

    from benchmarks.experts import demo_shaped_lora
    from experts.pool import ExpertPool, PoolConfig

    pool = ExpertPool(PoolConfig(max_batch_size=max(16, *levels)))
    adapters = [f"expert-{i}" for i in range(args.adapters)]
    for i, name in enumerate(adapters):
        pool.add_adapter(name, *demo_shaped_lora(i))
    keys = [pool._adapters[name] for name in adapters]
    base = pool._base if pool._base is not None else pool._shared_model().get_base_model()
    # the base model's own weights (the tied embedding once: it is also the LM head), no LoRA factors
    params = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    dtype = next(base.parameters()).dtype
    threads = torch.get_num_threads()
    gflops = matmul_gflops(dtype)
    gflops_fp32 = gflops if dtype == torch.float32 else matmul_gflops(torch.float32)
    bound = gflops * 1e9 / (2 * params)
    print(
        f"{threads} torch threads, {str(dtype).removeprefix('torch.')}; matmul {gflops:.0f} GFLOP/s; "
        f"{params / 1e6:.1f} M parameters -> bound {bound:.0f} tok/s",
        file=sys.stderr,
    )

    engine_series(pool, adapters, 1, 1, 4)  # warm-up
    figures: dict = {
        "threads": threads,
        "dtype": str(dtype).removeprefix("torch."),
        "adapters": args.adapters,
        "new_tokens": args.new_tokens,
        "matmul_gflops": gflops,
        "matmul_gflops_float32": gflops_fp32,
        "parameters": params,
        "bound_tps": bound,
        "engine_mixed": {},
        "engine_single": {},
        "hf_mixed": {},
        "hf_single": {},
    }
    for level in levels:
        count = requests_for(level, args.min_requests)
        figures["engine_mixed"][level] = engine_series(pool, adapters, level, count, args.new_tokens)
        figures["engine_single"][level] = engine_series(pool, adapters[:1], level, count, args.new_tokens)
        if not args.no_hf:
            figures["hf_mixed"][level] = hf_series(pool, keys, level, count, args.new_tokens)
            figures["hf_single"][level] = hf_series(pool, keys[:1], level, count, args.new_tokens)
        print(f"{level} clients done", file=sys.stderr)
    figures["llama_cpp"] = (
        "skipped (--no-llama)" if args.no_llama else llama_cpp_series(args.min_requests, args.new_tokens, threads)
    )

    rows = [
        (
            "compute bound",
            f"{bound:.0f} tok/s",
            f"matmul {gflops:.0f} GFLOP/s ({threads} threads, {figures['dtype']}) / (2 x {params / 1e6:.1f} M "
            f"parameters) per token; float32 matmul {gflops_fp32:.0f} GFLOP/s",
        )
    ]
    for level in levels:
        mixed, single = figures["engine_mixed"][level], figures["engine_single"][level]
        plural = "" if level == 1 else "s"
        penalty = 1 - mixed["tps"] / single["tps"]
        mixed["penalty_vs_single"] = penalty
        rows.append(
            (
                f"engine, {level} client{plural}, mixed adapters",
                f"{mixed['tps']:.1f} tok/s",
                f"{mixed['tps'] / bound:.1%} of bound; {mixed['tokens_per_step']:.1f} tokens/step",
            )
        )
        rows.append(
            (
                f"engine, {level} client{plural}, one adapter",
                f"{single['tps']:.1f} tok/s",
                f"mixed-adapter penalty {penalty:.1%}",
            )
        )
        rows.append(
            (
                f"engine, {level} client{plural}, TTFT p50 / p99",
                f"{mixed['ttft_s']['p50'] * 1000:.0f} / {mixed['ttft_s']['p99'] * 1000:.0f} ms",
                "mixed adapters",
            )
        )
        rows.append(
            (
                f"engine, {level} client{plural}, ITL p50 / p99",
                f"{mixed['itl_s']['p50'] * 1000:.0f} / {mixed['itl_s']['p99'] * 1000:.0f} ms",
                "mixed adapters",
            )
        )
        if not args.no_hf:
            hf_m, hf_s = figures["hf_mixed"][level], figures["hf_single"][level]
            hf_m["penalty_vs_single"] = 1 - hf_m["tps"] / hf_s["tps"]
            rows.append(
                (
                    f"HF generate, batch {level}, mixed adapters",
                    f"{hf_m['tps']:.1f} tok/s",
                    f"one adapter {hf_s['tps']:.1f} tok/s (penalty {hf_m['penalty_vs_single']:.1%}); "
                    f"engine x{mixed['tps'] / hf_m['tps']:.2f}",
                )
            )
    llama = figures["llama_cpp"]
    rows.append(
        (
            "llama.cpp, 1 client, base GGUF",
            f"{llama['tps']:.1f} tok/s" if isinstance(llama, dict) else "—",
            "Q4_1 weights, no adapter" if isinstance(llama, dict) else llama,
        )
    )
    print_table(f"Decoding, {args.new_tokens} new tokens, greedy, {args.adapters} adapters", rows)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
