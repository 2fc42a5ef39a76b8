"""Expert pool benchmark: memory of many adapters vs model copies, mixed-batch throughput, switch cost.

    .venv/bin/python benchmarks/experts.py            # prints one table, ours beside the baseline
    .venv/bin/python benchmarks/experts.py --json experts.json   # and writes its figures as JSON

Each memory figure is the RSS of a fresh child process (so runs do not share allocations).
Adapters are random LoRA adapters shaped like the demo experts (rank 8, the 7 linear layers of
the last 10 decoder layers). On a CUDA machine the same is measured with a 4-bit base.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUESTIONS = [
    "Explain what a contract is.",
    "What causes fever?",
    "How do I compute compound interest?",
    "What is 17 times 23?",
    "Write a Python function that reverses a list.",
    "Why is the sky blue?",
    "Who wrote Hamlet?",
    "What is inflation?",
]


def demo_shaped_lora(seed: int):
    """A random adapter with the demo experts' shapes (peft init, then non-zero B)."""
    import torch

    from experts.finetune import FinetuneConfig, lora_config_for

    config = lora_config_for(FinetuneConfig(), 30)
    config.inference_mode = True
    dims = {
        "q_proj": (576, 576),
        "k_proj": (192, 576),
        "v_proj": (192, 576),
        "o_proj": (576, 576),
        "gate_proj": (1536, 576),
        "up_proj": (1536, 576),
        "down_proj": (576, 1536),
    }
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in config.layers_to_transform:
        for module, (out_dim, in_dim) in dims.items():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(config.r, in_dim, generator=gen) / in_dim**0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, config.r, generator=gen) * 0.05
    return config, state


def rss_mib() -> float:
    import psutil

    gc.collect()
    try:  # hand freed heap pages back to the OS so RSS shows what is really held (all rows alike)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss / (1 << 20)


# ---------------------------------------------------------------- child measurements


def child_adapters(count: int, quantization: str) -> dict:
    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    pool = ExpertPool(PoolConfig(policy=DevicePolicy(base_quantization=quantization)))
    base_rss = rss_mib()
    started = time.perf_counter()
    for i in range(count):
        pool.add_adapter(f"expert-{i}", *demo_shaped_lora(i))
    add_s = (time.perf_counter() - started) / max(count, 1)
    pool.generate(
        [
            {
                "expert": f"expert-{count - 1}" if count else "base",
                "messages": [{"role": "user", "content": "hi"}],
                "params": {"max_new_tokens": 2},
            }
        ]
    )
    import torch

    gpu = torch.cuda.memory_allocated() / (1 << 20) if torch.cuda.is_available() else 0.0
    free = torch.cuda.mem_get_info()[0] / (1 << 20) if torch.cuda.is_available() else 0.0
    return {
        "rss_mib": rss_mib(),
        "base_rss_mib": base_rss,
        "adapter_add_ms": add_s * 1000,
        "adapter_mib": pool.memory()["adapter_bytes"] / (1 << 20),
        "gpu_mib": gpu,
        "gpu_free_mib": free,
    }


def child_copies(count: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from experts.base_models import ensure_base_model

    folder = ensure_base_model()
    models, times = [], []
    for _ in range(count):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        times.append(time.perf_counter() - started)
        # safetensors loads are memory-mapped: three loads of one file would share pages. Distinct
        # full experts have distinct weights, so give each copy its own memory.
        for param in model.parameters():
            param.data = param.data.clone()
        models.append(model)
    with torch.inference_mode():
        models[-1](torch.tensor([[1, 2, 3]]))
    return {"rss_mib": rss_mib(), "load_s": min(times)}


def child_throughput(requests: int, new_tokens: int) -> dict:
    from experts.pool import ExpertPool

    pool = ExpertPool()
    for i in range(requests):
        pool.add_adapter(f"expert-{i}", *demo_shaped_lora(i))
    batch = [
        {
            "expert": f"expert-{i}",
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "params": {"max_new_tokens": new_tokens},
        }
        for i in range(requests)
    ]
    pool.generate(batch[:1])  # warm-up
    pool.config.batched_lora = False  # peft's own mixed-adapter loop, for comparison
    started = time.perf_counter()
    peft_tokens = sum(r.completion_tokens for r in pool.generate(batch))
    peft_s = time.perf_counter() - started
    pool.config.batched_lora = True
    started = time.perf_counter()
    results = pool.generate(batch)
    mixed_s = time.perf_counter() - started
    mixed_tokens = sum(r.completion_tokens for r in results)
    started = time.perf_counter()
    seq_results = [pool.generate([r])[0] for r in batch]
    seq_s = time.perf_counter() - started
    seq_tokens = sum(r.completion_tokens for r in seq_results)
    return {
        "mixed_tok_s": mixed_tokens / mixed_s,
        "sequential_tok_s": seq_tokens / seq_s,
        "peft_mixed_tok_s": peft_tokens / peft_s,
        "peft_mixed_s": peft_s,
        "mixed_s": mixed_s,
        "sequential_s": seq_s,
        "tokens": mixed_tokens,
    }


def child_switch() -> dict:
    """Cost of serving a request on another adapter: nothing to load, the row just names it."""
    from experts.pool import ExpertPool

    pool = ExpertPool()
    for i in range(2):
        pool.add_adapter(f"expert-{i}", *demo_shaped_lora(i))

    def req(name: str) -> dict:
        return {"expert": name, "messages": [{"role": "user", "content": "hi"}], "params": {"max_new_tokens": 1}}

    pool.generate([req("expert-0")])
    same, other = [], []
    for _ in range(5):
        started = time.perf_counter()
        pool.generate([req("expert-0")])
        same.append(time.perf_counter() - started)
        started = time.perf_counter()
        pool.generate([req("expert-1")])
        other.append(time.perf_counter() - started)
    return {"switch_ms": max(0.0, (min(other) - min(same)) * 1000), "request_ms": min(same) * 1000}


CHILDREN = {"adapters": child_adapters, "copies": child_copies, "throughput": child_throughput, "switch": child_switch}


def run_child(kind: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {kind} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", default="1,10,100", help="adapter counts to measure (default 1,10,100)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per request in the throughput test")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        func = CHILDREN[kind]
        print(json.dumps(func(*[int(x) if x.isdigit() else x for x in rest])))
        return

    import torch

    from benchmarks._report import print_table, write_json
    from experts.base_models import prepare_base_models

    prepare_base_models(progress=True)
    cuda = torch.cuda.is_available()
    rows, adapters, cuda_adapters = [], {}, {}
    one = run_child("copies", "1")
    three = run_child("copies", "3")
    rows.append(("RSS, 1 full model copy (baseline)", f"{one['rss_mib']:.0f} MiB", ""))
    rows.append(("RSS, 3 full model copies (baseline)", f"{three['rss_mib']:.0f} MiB", ""))
    for count in [int(c) for c in args.adapters.split(",")]:
        res = adapters[count] = run_child("adapters", str(count), "none")
        rows.append(
            (
                f"RSS, base + {count} LoRA experts (pool)",
                f"{res['rss_mib']:.0f} MiB",
                f"{res['rss_mib'] / one['rss_mib']:.2f}x one copy; adapters {res['adapter_mib']:.1f} MiB; "
                f"add {res['adapter_add_ms']:.0f} ms each",
            )
        )
    tp = run_child("throughput", "8", str(args.new_tokens))
    rows.append(
        (
            "8 requests / 8 experts, sequential (baseline)",
            f"{tp['sequential_tok_s']:.1f} tok/s",
            f"{tp['sequential_s']:.1f} s",
        )
    )
    rows.append(
        (
            "8 requests / 8 experts, peft mixed-adapter batch",
            f"{tp['peft_mixed_tok_s']:.1f} tok/s",
            f"{tp['peft_mixed_s']:.1f} s; {tp['peft_mixed_tok_s'] / tp['sequential_tok_s']:.2f}x sequential",
        )
    )
    rows.append(
        (
            "8 requests / 8 experts, one mixed batch (pool)",
            f"{tp['mixed_tok_s']:.1f} tok/s",
            f"{tp['mixed_s']:.1f} s; {tp['mixed_tok_s'] / tp['sequential_tok_s']:.2f}x sequential",
        )
    )
    sw = run_child("switch")
    rows.append(
        (
            "switch to another LoRA expert (pool)",
            f"{sw['switch_ms']:.1f} ms",
            f"1-token request {sw['request_ms']:.0f} ms",
        )
    )
    rows.append(("load a full expert from disk (baseline)", f"{one['load_s'] * 1000:.0f} ms", "SmolLM2 fp32"))
    if cuda:
        for count in (1, 100):
            res = cuda_adapters[count] = run_child("adapters", str(count), "4bit")
            per = res["adapter_mib"] / max(count, 1)
            rows.append(
                (
                    f"CUDA 4-bit base + {count} LoRA experts",
                    f"{res['gpu_mib']:.0f} MiB GPU",
                    f"{torch.cuda.get_device_name(0)}; ~{int(res['gpu_free_mib'] / per)} more adapters "
                    "fit in free GPU memory",
                )
            )
    else:
        rows.append(("CUDA 4-bit base", "n/a", "no CUDA device on this machine"))
    print_table(
        f"experts benchmark ({os.cpu_count()} CPUs, {args.new_tokens} new tokens per request, "
        f"MOSE_CPU_THREADS={os.environ.get('MOSE_CPU_THREADS', 'unset (torch default)')})",
        rows,
    )
    write_json(
        args.json,
        {
            "cpus": os.cpu_count(),
            "new_tokens": args.new_tokens,
            "cpu_threads": os.environ.get("MOSE_CPU_THREADS"),
            "copies": {"1": one, "3": three},
            "adapters": adapters,
            "throughput": tp,
            "switch": sw,
            "cuda_4bit_adapters": cuda_adapters,
        },
    )


if __name__ == "__main__":
    main()
