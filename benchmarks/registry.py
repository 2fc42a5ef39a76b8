"""Registry benchmark: registration latency, `mose expert list` at 1,000 experts, concurrent throughput.

Run: ``.venv/bin/python benchmarks/registry.py [--json FILE]`` (about a minute on 2 cores). Prints
one table, each figure beside its target or baseline; ``--json`` also writes the figures to FILE. Uses the real CLI (subprocess) where the figure is a
user-facing command, and fresh temporary data directories.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._report import write_json  # noqa: E402
from registry import Registry  # noqa: E402
from tests._fixtures.registry import build_lora_expert, write_manifest  # noqa: E402


def _cli(home: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [str(REPO_ROOT / ".venv/bin/mose"), *args],
        env={**os.environ, "MOSE_HOME": str(home)},
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    return time.perf_counter() - start


def bench_register_2mb(work: Path, repeats: int) -> dict[str, float]:
    """Register a ~2 MB LoRA adapter (API and CLI); baseline: plain sha256 + copy of the same files."""
    home = work / "home-2mb"
    api, cli, raw = [], [], []
    with Registry.open(home) as reg:
        for i in range(repeats):
            expert = build_lora_expert(work / f"2mb-{i}", name=f"big-law-{i}", layers=30, rank=9, seed=i)
            start = time.perf_counter()
            reg.add(expert.manifest_path)
            api.append(time.perf_counter() - start)
            # the I/O floor: hash each file, copy it, fsync it
            start = time.perf_counter()
            for rel in expert.manifest["files"]:
                src, dst = expert.root / rel, work / f"raw-{i}-{rel}"
                hashlib.sha256(src.read_bytes()).hexdigest()
                shutil.copyfile(src, dst)
                with open(dst, "rb+") as handle:
                    os.fsync(handle.fileno())
            raw.append(time.perf_counter() - start)
    for i in range(repeats):
        expert = build_lora_expert(work / f"2mb-cli-{i}", name=f"cli-law-{i}", layers=30, rank=9, seed=100 + i)
        cli.append(_cli(home, "expert", "add", str(expert.manifest_path)))
    size = (work / "2mb-0" / "adapter_model.safetensors").stat().st_size
    return {
        "size_mb": size / 1e6,
        "api": statistics.median(api),
        "cli": statistics.median(cli),
        "raw": statistics.median(raw),
    }


def bench_list_1000(work: Path, count: int, repeats: int) -> dict[str, float]:
    """Wall time of `mose expert list` (and --json) with ``count`` registered experts."""
    home = work / "home-1000"
    base = build_lora_expert(work / "many", name="many-0", layers=1)
    start = time.perf_counter()
    with Registry.open(home) as reg:
        for i in range(count):
            path = base.root / f"manifest-{i}.yaml"
            write_manifest(
                path, {**base.manifest, "name": f"many-{i}", "domains": [["law", "medicine", "code", "math"][i % 4]]}
            )
            reg.add(path)
            if i % 200 == 199:
                print(f"  registered {i + 1}/{count}", file=sys.stderr)
        fill = time.perf_counter() - start
        start = time.perf_counter()
        assert len(reg.list()) == count
        api_list = time.perf_counter() - start
    text = [_cli(home, "expert", "list") for _ in range(repeats)]
    as_json = [_cli(home, "expert", "list", "--json") for _ in range(repeats)]
    help_only = [_cli(home, "--help") for _ in range(repeats)]
    return {
        "fill_per_expert": fill / count,
        "api": api_list,
        "cli": statistics.median(text),
        "cli_json": statistics.median(as_json),
        "cli_startup": statistics.median(help_only),
    }


def _register_in_processes(home: Path, batches: list[list[str]], go: Path) -> float:
    code = (
        "import sys, json; from tests._fixtures.registry import register_many; "
        "register_many(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(home), json.dumps(batch), str(go)], cwd=REPO_ROOT)
        for batch in batches
    ]
    while len(list(go.parent.glob(f"{go.name}.ready.*"))) < len(procs):  # all imported and open
        if any(proc.poll() not in (None, 0) for proc in procs):
            raise SystemExit("a worker failed")
        time.sleep(0.01)
    start = time.perf_counter()
    go.touch()
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit("a worker failed")
    return time.perf_counter() - start


def bench_concurrency(work: Path, total: int, workers: int) -> dict[str, float]:
    """Experts/s registering ``total`` experts with 1 process vs ``workers`` processes."""
    dirs = [str(build_lora_expert(work / f"conc-{i}", name=f"conc-{i}", layers=2, seed=i).root) for i in range(total)]
    one = _register_in_processes(work / "home-1proc", [dirs], work / "go1")
    many = _register_in_processes(work / "home-nproc", [dirs[w::workers] for w in range(workers)], work / "goN")
    with Registry.open(work / "home-nproc") as reg:
        assert len(reg.list()) == total and reg.audit_verify().ok
    return {"one": total / one, "many": total / many}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=1000, help="registered experts for the list timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=100, help="experts registered in the throughput test")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mose-bench-") as tmp:
        work = Path(tmp)
        print("registering a 2 MB adapter ...", file=sys.stderr)
        reg2 = bench_register_2mb(work, args.repeats)
        print(f"listing with {args.experts} experts ...", file=sys.stderr)
        lst = bench_list_1000(work, args.experts, min(args.repeats, 3))
        print("concurrent registration ...", file=sys.stderr)
        conc = bench_concurrency(work, args.concurrent, 4)
    rows = [
        ("metric", "mose", "baseline / target"),
        (
            f"register {reg2['size_mb']:.1f} MB LoRA expert, API (median)",
            f"{reg2['api'] * 1000:.0f} ms",
            f"target <= 1000 ms; raw sha256+copy+fsync {reg2['raw'] * 1000:.0f} ms",
        ),
        (
            f"register {reg2['size_mb']:.1f} MB LoRA expert, `mose expert add`",
            f"{reg2['cli'] * 1000:.0f} ms",
            "target <= 1000 ms",
        ),
        (
            f"`mose expert list`, {args.experts} experts",
            f"{lst['cli'] * 1000:.0f} ms",
            f"target <= 1000 ms; `mose --help` {lst['cli_startup'] * 1000:.0f} ms",
        ),
        (f"`mose expert list --json`, {args.experts} experts", f"{lst['cli_json'] * 1000:.0f} ms", "target <= 1000 ms"),
        (f"Registry.list(), {args.experts} experts (in process)", f"{lst['api'] * 1000:.0f} ms", "-"),
        ("register one small expert (fill phase, mean)", f"{lst['fill_per_expert'] * 1000:.1f} ms", "-"),
        (
            f"registration throughput, 4 processes ({args.concurrent} experts)",
            f"{conc['many']:.1f} experts/s",
            f"1 process: {conc['one']:.1f} experts/s",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))
    write_json(
        args.json,
        {
            "register": reg2,
            "list": lst | {"experts": args.experts},
            "concurrency": conc | {"experts": args.concurrent, "processes": 4},
        },
    )  # seconds, experts/s


if __name__ == "__main__":
    main()
