"""Device and precision policy, in one place.

On CUDA a model is loaded with the quantisation its manifest asks for (bitsandbytes nf4 4-bit or
8-bit) or in bf16; on CPU in bf16 where the CPU has bf16 instructions (AVX-512 bf16 or AMX), else
in fp32 (bitsandbytes' CPU kernels are slower than fp32 there, so manifests' quantisation is
ignored on CPU).
Every loader asks :meth:`DevicePolicy.plan` instead of deciding for itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

THREADS_ENV = "MOSE_CPU_THREADS"
CPU_DTYPE_ENV = "MOSE_CPU_DTYPE"
Quantization = Literal["none", "8bit", "4bit"]
REUSE_LIMIT_BYTES = 32 << 20
"""Freed blocks up to this size are kept for reuse (glibc's largest mmap threshold)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


@dataclass(frozen=True)
class LoadPlan:
    """How to load one model: device, dtype, and the bitsandbytes config (None: unquantised)."""

    device: str
    dtype: Any
    quantization: Quantization
    quantization_config: Any = None

    def from_pretrained_kwargs(self) -> dict:
        """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (offline, no remote code)."""
        kwargs: dict = {"dtype": self.dtype, "local_files_only": True, "trust_remote_code": False}
        if self.quantization_config is not None:
            kwargs["quantization_config"] = self.quantization_config
            kwargs["device_map"] = {"": self.device}
        return kwargs


class DevicePolicy(BaseModel):
    """Where models run and at which precision."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' picks CUDA when available, else CPU."
    )
    cuda_dtype: Literal["bfloat16", "float16"] = Field(
        default="bfloat16", description="Compute dtype on CUDA (and of the 4-bit compute)."
    )
    base_quantization: Quantization = Field(
        default="none", description="Quantisation of the shared base model on CUDA."
    )
    cpu_threads: int | None = Field(
        default_factory=lambda: int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None,
        description="torch intra-op threads on CPU (default $MOSE_CPU_THREADS, else torch's default). "
        "On a CPU shared with other busy processes, 1 thread can be several times faster "
        "than 2: parallel regions wait for the slowest thread.",
    )
    cpu_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default_factory=lambda: os.environ.get(CPU_DTYPE_ENV) or "auto",
        validate_default=True,
        description="Weights and activations on CPU (default $MOSE_CPU_DTYPE, else auto). 'auto': bfloat16 "
        "where the CPU has bf16 instructions (AVX-512 bf16 or AMX), else float32 (emulated bf16 "
        "is slower). Measured on 2 cores with AVX-512 bf16: the jury's evidence 1.6-1.75x faster, "
        "held-out AUROC and ECE of a calibrator fitted on float32 evidence unchanged within "
        "0.003 (benchmarks/jury.py precision, docs/benchmarks.md). Fine-tuning stays float32.",
    )
    cpu_reuse_freed_memory: bool = Field(
        default=True,
        description="On CPU with glibc: keep freed blocks up to 32 MB in the process for reuse instead of "
        "handing them back to the OS at once. Scoring allocates and frees tens of MB per layer, "
        "and memory fresh from the OS is paid for again page by page (measured on 2 cores: the "
        "jury's evidence 7-13 % faster at 16-48 items per call). The process's RSS then stays "
        "near its peak.",
    )

    def resolve_device(self) -> str:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            from registry.errors import MoseError

            raise MoseError("device 'cuda' requested but no CUDA device is available: use device 'auto' or 'cpu'")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolve_cpu_dtype(self) -> Literal["float32", "bfloat16"]:
        """The CPU precision :attr:`cpu_dtype` asks for, 'auto' resolved on this machine."""
        if self.cpu_dtype != "auto":
            return self.cpu_dtype
        return "bfloat16" if cpu_has_bf16_instructions() else "float32"

    def compute_dtype(self, device: str) -> str:
        """Name of the torch dtype models compute in on ``device`` ("cpu" or a CUDA device)."""
        return self.resolve_cpu_dtype() if device == "cpu" else self.cuda_dtype

    def plan(self, quantization: Quantization = "none") -> LoadPlan:
        """The load plan for a model whose manifest asks for ``quantization``."""
        import torch

        device = self.resolve_device()
        if device == "cpu":
            if self.cpu_threads:
                torch.set_num_threads(self.cpu_threads)
            if self.cpu_reuse_freed_memory:
                reuse_freed_memory()
            return LoadPlan(device="cpu", dtype=getattr(torch, self.compute_dtype(device)), quantization="none")
        compute = getattr(torch, self.compute_dtype(device))
        if quantization == "none":
            return LoadPlan(device=device, dtype=compute, quantization="none")
        return LoadPlan(
            device=device,
            dtype=compute,
            quantization=quantization,
            quantization_config=bnb_config(quantization, compute),
        )

    def base_plan(self) -> LoadPlan:
        return self.plan(self.base_quantization)


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 bf16 or AMX tiles), as torch sees it."""
    import torch

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)


def reuse_freed_memory(limit_bytes: int = REUSE_LIMIT_BYTES) -> bool:
    """Ask glibc's allocator (process-wide) to serve blocks up to ``limit_bytes`` from its heap and
    to keep freed memory instead of trimming it; True when it took both settings, False where
    the C library is not glibc. By default glibc maps large blocks fresh from the OS and unmaps
    them when freed, so a forward pass that frees and re-allocates its activations takes a page
    fault for every 4 KiB of them, every time."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def bnb_config(quantization: Quantization, compute_dtype: Any):
    """bitsandbytes config: nf4 4-bit with double quantisation, or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)
