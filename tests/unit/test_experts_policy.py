"""Device and precision policy: CPU -> bf16 with bf16 instructions, else fp32; CUDA -> nf4 / 8-bit or bf16."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from experts.policy import DevicePolicy, bnb_config
from registry.errors import MoseError


def test_cpu_ignores_the_manifests_quantisation():
    policy = DevicePolicy(device="cpu", cpu_dtype="float32")
    for quantization in ("none", "8bit", "4bit"):
        plan = policy.plan(quantization)
        assert (plan.device, plan.dtype, plan.quantization, plan.quantization_config) == (
            "cpu",
            torch.float32,
            "none",
            None,
        )
    kwargs = policy.plan().from_pretrained_kwargs()
    assert kwargs == {"dtype": torch.float32, "local_files_only": True, "trust_remote_code": False}


def test_cpu_runs_in_bf16_where_the_cpu_has_bf16_instructions(monkeypatch):
    from experts import policy

    monkeypatch.delenv("MOSE_CPU_DTYPE", raising=False)
    assert DevicePolicy().cpu_dtype == "auto"
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(policy, "cpu_has_bf16_instructions", lambda native=native: native)
        plan = DevicePolicy(device="cpu").plan("4bit")
        assert (plan.dtype, plan.quantization, plan.quantization_config) == (dtype, "none", None)
        assert DevicePolicy(device="cpu", cpu_dtype="float32").plan().dtype == torch.float32  # asked: kept
        assert DevicePolicy(device="cpu", cpu_dtype="bfloat16").plan().dtype == torch.bfloat16
    monkeypatch.setenv("MOSE_CPU_DTYPE", "bfloat16")
    assert DevicePolicy(device="cpu").plan("8bit").dtype == torch.bfloat16
    monkeypatch.setenv("MOSE_CPU_DTYPE", "fp16")  # a typo in the environment is named, not ignored
    with pytest.raises(ValidationError, match="cpu_dtype"):
        DevicePolicy()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's CPU flags")
def test_bf16_instructions_are_read_as_the_kernel_lists_them():
    from experts.policy import cpu_has_bf16_instructions

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_bf16_instructions() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_bitsandbytes_configs():
    four = bnb_config("4bit", torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("8bit", torch.bfloat16).load_in_8bit


def test_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOSE_CPU_THREADS", "1")
    assert DevicePolicy().cpu_threads == 1
    monkeypatch.delenv("MOSE_CPU_THREADS")
    assert DevicePolicy().cpu_threads is None


_MAPPED_BY_A_16MB_BLOCK = """
import ctypes, sys
from experts.policy import reuse_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(block)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_reuse_freed_memory_serves_large_blocks_from_the_heap():
    """By default glibc maps a 16 MB block fresh from the OS (paid for again page by page each
    time); after reuse_freed_memory it comes from the heap, where freed memory is kept."""

    def mapped(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _MAPPED_BY_A_16MB_BLOCK, mode],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            check=True,
        )
        return int(run.stdout)

    assert mapped("default") >= 16 << 20
    assert mapped("reuse") == 0


def test_cpu_plan_reuses_freed_memory_unless_told_not_to(monkeypatch):
    import experts.policy

    calls = []
    monkeypatch.setattr(experts.policy, "reuse_freed_memory", lambda: calls.append(True) or True)
    DevicePolicy(device="cpu").plan()
    DevicePolicy(device="cpu", cpu_reuse_freed_memory=False).plan()
    assert calls == [True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(MoseError, match="device 'cuda' requested but no CUDA device is available"):
        DevicePolicy(device="cuda").plan()


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", ["4bit", "8bit", "none"])
def test_cuda_plans(quantization):
    plan = DevicePolicy(device="cuda").plan(quantization)
    assert plan.device == "cuda" and plan.dtype == torch.bfloat16
    assert (plan.quantization_config is None) == (quantization == "none")
    if quantization != "none":
        assert plan.from_pretrained_kwargs()["device_map"] == {"": "cuda"}
