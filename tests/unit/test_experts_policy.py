"""Device and precision policy: CPU -> fp32; CUDA -> bitsandbytes nf4 / 8-bit or bf16."""

from __future__ import annotations

import pytest
import torch

from experts.policy import DevicePolicy, bnb_config
from registry.errors import MoseError


def test_cpu_is_always_fp32_whatever_the_manifest_asks():
    policy = DevicePolicy(device="cpu")
    for quantization in ("none", "8bit", "4bit"):
        plan = policy.plan(quantization)
        assert (plan.device, plan.dtype, plan.quantization, plan.quantization_config) == \
            ("cpu", torch.float32, "none", None)
    kwargs = policy.plan().from_pretrained_kwargs()
    assert kwargs == {"dtype": torch.float32, "local_files_only": True, "trust_remote_code": False}


def test_bitsandbytes_configs():
    four = bnb_config("4bit", torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("8bit", torch.bfloat16).load_in_8bit


def test_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOSE_CPU_THREADS", "1")
    assert DevicePolicy().cpu_threads == 1
    monkeypatch.delenv("MOSE_CPU_THREADS")
    assert DevicePolicy().cpu_threads is None


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
