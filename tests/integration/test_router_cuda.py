"""The router's ONNX graph on ONNX Runtime's CUDA provider (run on a GPU machine; skipped without CUDA).

The graph is exported by the router's own code (:func:`router_model.export.export_onnx`, and
:func:`~router_model.export.quantize_int8` for the int8 copy the runtime uses by default) from a
router net over a tiny BERT built from a real config with seeded random weights, so no MiniLM
weights are needed: this checks the CUDA code path (provider choice, int64 inputs, dynamic batch
and length, the quantised graph), not routing quality.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def router_graphs(tmp_path_factory):
    import torch
    from transformers import BertConfig

    from router_model.export import ONNX_FP32, ONNX_INT8, export_onnx, quantize_int8
    from router_model.model import net_from_config

    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    net = net_from_config(config, num_labels=6).eval()
    directory = tmp_path_factory.mktemp("router-graph")
    export_onnx(net, directory / ONNX_FP32)
    quantize_int8(directory / ONNX_FP32, directory / ONNX_INT8)
    return {"fp32": directory / ONNX_FP32, "int8": directory / ONNX_INT8}


def _batch(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1::2, length // 2 :] = 0  # every other row padded: the mask must reach the CUDA kernels
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("graph", ["fp32", "int8"])
def test_router_graph_runs_on_the_cuda_provider_and_agrees_with_cpu(router_graphs, graph):
    from router_model.export import OUTPUT_NAME
    from router_model.runtime import choose_providers, open_session

    assert choose_providers(True)[0] == "CUDAExecutionProvider", (
        "ONNX Runtime lists no CUDA provider on a CUDA machine: install onnxruntime-gpu, not onnxruntime"
    )
    cuda = open_session(router_graphs[graph], choose_providers(use_cuda=True))
    cpu = open_session(router_graphs[graph], choose_providers(use_cuda=False))
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"  # not the silent CPU fallback
    assert cpu.get_providers() == ["CPUExecutionProvider"]
    for rows, length, seed in ((1, 5, 0), (64, 24, 1), (3, 128, 2)):  # 128: every position embedding
        feed = _batch(rows, length, seed)
        on_gpu = cuda.run([OUTPUT_NAME], feed)[0]
        on_cpu = cpu.run([OUTPUT_NAME], feed)[0]
        assert on_gpu.shape == (rows, 6)
        np.testing.assert_allclose(on_gpu.sum(axis=1), 1.0, atol=1e-4)
        # TF32 matmuls on the GPU (fp32 graph) and another int8 rounding path (int8 graph)
        np.testing.assert_allclose(on_gpu, on_cpu, atol=5e-3 if graph == "fp32" else 2e-2)
