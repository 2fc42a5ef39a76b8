"""The trained router: sane held-out accuracy, ONNX == torch, calibration, abstention, errors."""

from __future__ import annotations

import numpy as np
import pytest

from registry.errors import MoseError
from router_model.artifact import HELDOUT_ROWS, VALIDATION_ROWS, current_dir, read_metadata, set_current
from router_model.data import load_jsonl
from router_model.runtime import FallbackRouter, OnnxRouter, load_router
from tests._fixtures.router import UNSEEN_DOMAIN

NONSENSE = "zxqv blorp fnord wibble 8812 ## qqq"


@pytest.fixture(scope="module")
def router(trained_router_home):
    return OnnxRouter.load(trained_router_home)


def test_small_subset_reaches_sane_heldout_accuracy(router):
    rows = [r for r in load_jsonl(router.directory / HELDOUT_ROWS) if r.domain != UNSEEN_DOMAIN]
    probs = router.probabilities([r.query for r in rows])
    predicted = [router.labels[i] for i in probs.argmax(1)]
    accuracy = np.mean([p == r.domain for p, r in zip(predicted, rows)])
    # 9 domains, chance ~0.11; head-only on ~50 rows per domain measures ~0.75.
    assert accuracy > 0.6, accuracy
    assert UNSEEN_DOMAIN not in router.labels


def test_onnx_equals_torch_probabilities(router):
    import torch

    from router_model.model import load as load_net
    from router_model.tokens import pad

    net = load_net(router.directory)
    queries = [r.query for r in load_jsonl(router.directory / VALIDATION_ROWS)[:16]]
    ids = [e.ids for e in router.tokenizer.encode_batch(queries)]
    input_ids, mask = pad(ids)
    with torch.no_grad():
        expected, expected_support = (t.numpy() for t in net(torch.from_numpy(input_ids), torch.from_numpy(mask)))
    from router_model.export import ONNX_FP32
    from router_model.runtime import choose_providers, open_session

    session = open_session(router.directory / ONNX_FP32, choose_providers(use_cuda=False))
    got, support = session.run(None, {"input_ids": input_ids, "attention_mask": mask})
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(support - expected_support).max() < 1e-4
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)


def test_memory_of_training_queries_is_mixed_in_and_older_artifacts_load_without_one(router, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from router_model.artifact import TRAIN_ROWS
    from router_model.model import ENCODER_CONFIG_FILE, WEIGHTS_FILE
    from router_model.model import load as load_net

    net = load_net(router.directory)
    meta = router.metadata
    assert net.k == meta.config["neighbours"] == 10
    assert len(net.memory) == len(load_jsonl(router.directory / TRAIN_ROWS))
    assert 0.0 <= float(net.memory_weight) == meta.metrics["memory_weight"] <= 0.7
    with torch.no_grad():
        # A remembered query's nearest row is itself (similarity 1, tau 0.02): its own label wins.
        own = net.neighbour_probs(net.memory[:20]).argmax(1)
        assert torch.equal(own, net.memory_labels[:20].argmax(1))
        probs = torch.softmax(torch.randn(20, len(meta.labels)), dim=1)
        net.memory_weight.fill_(0.0)
        assert torch.equal(net.mix(probs, net.memory[:20]), probs)
        net.memory_weight.fill_(1.0)
        assert torch.allclose(net.mix(probs, net.memory[:20]), net.neighbour_probs(net.memory[:20]))

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(router.directory / ENCODER_CONFIG_FILE, old / ENCODER_CONFIG_FILE)
    state = {
        k: v
        for k, v in load_file(str(router.directory / WEIGHTS_FILE)).items()
        if not k.startswith(("memory", "neighbours"))
    }
    save_file(state, str(old / WEIGHTS_FILE))
    assert load_net(old).k == 0  # a version written before the memory: the classifier alone


def test_calibration_lowers_validation_ece(router):
    metrics = router.metadata.metrics
    assert metrics["val_ece"] < metrics["val_ece_uncalibrated"]
    assert router.metadata.temperature != 1.0


def test_metadata_records_choice_and_data_hashes(router):
    meta = router.metadata
    assert meta.fine_tuned is False and meta.config["fine_tune"] == "no"
    assert meta.data["files"] and all(len(h) == 64 for h in meta.data["files"].values())
    assert len(meta.data["rows_sha256"]["train.jsonl"]) == 64
    assert {"model.onnx", "tokenizer.json", "weights.safetensors", "heldout.jsonl"} <= set(meta.files)
    assert 0 < meta.threshold < 1


def test_nonsense_query_abstains_to_the_fallback(router):
    decision = router.route(NONSENSE)
    assert decision.abstained, decision
    assert decision.expert == "base"
    assert decision.confidence < router.threshold or decision.support < router.metadata.min_support


def test_route_batch_matches_single_routes_and_reports_provider(router):
    queries = [
        "What are the side effects of ibuprofen?",
        "Solve 3x + 5 = 20 for x.",
        "write a python function to reverse a list",
    ]
    batch = router.route_batch(queries)
    singles = [router.route(q) for q in queries]
    assert [d.domain for d in batch] == [d.domain for d in singles]
    # int8 dynamic quantisation scales activations per batch, so batch and single runs agree
    # closely but not bit for bit (fp32 graphs agree to 1e-4: see the ONNX test).
    assert all(abs(a.confidence - b.confidence) < 0.02 for a, b in zip(batch, singles))
    assert [d.domain for d in batch] == ["medicine", "math", "code"]
    assert len(batch[0].top_k) == 3 and batch[0].top_k[0].p >= batch[0].top_k[1].p
    assert router.provider in router.session.get_providers()


def test_graph_choice_fp32_on_cuda_else_the_artifacts_choice(router):
    from router_model.artifact import ONNX_FP32, ONNX_INT8
    from router_model.runtime import choose_graph

    both = router.metadata.model_copy(update={"onnx_file": ONNX_INT8, "files": {ONNX_FP32: "x", ONNX_INT8: "y"}})
    assert choose_graph(both, on_cuda=True) == ONNX_FP32  # int8 runs slower on GPUs
    assert choose_graph(both, on_cuda=False) == ONNX_INT8
    int8_only = both.model_copy(update={"files": {ONNX_INT8: "y"}})
    assert choose_graph(int8_only, on_cuda=True) == ONNX_INT8


def test_without_a_gpu_the_cpu_provider_and_the_artifacts_graph_are_used(router):
    """onnxruntime-gpu lists its CUDA provider on a machine without a GPU; it is not asked for."""
    from router_model.runtime import choose_providers, cuda_device_present

    if cuda_device_present():
        pytest.skip("a GPU is present (tests/integration/test_router_cuda.py covers it)")
    assert choose_providers(True) == ["CPUExecutionProvider"]
    assert router.graph_file == router.metadata.onnx_file
    assert router.provider == "CPUExecutionProvider"


def test_empty_query_is_refused(router):
    with pytest.raises(MoseError, match="non-empty text query"):
        router.route("   ")


def test_missing_artifact_is_a_clear_error_and_fallback_answers(mose_home):
    with pytest.raises(MoseError, match=r"no router artifact in .*mose router train"):
        OnnxRouter.load(mose_home)
    fallback = load_router(mose_home, strict=False)
    assert isinstance(fallback, FallbackRouter)
    assert fallback.route("anything").expert == "base"


def test_corrupted_graph_is_detected_and_files_left_intact(router_home_copy):
    directory = current_dir(router_home_copy.router_dir)
    graph = directory / read_metadata(directory).onnx_file
    original = graph.read_bytes()
    graph.write_bytes(original[:1000] + b"\0garbage" + original[1008:])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(MoseError, match=r"does not match its recorded sha256 .*retrain with `mose router train`"):
        OnnxRouter.load(router_home_copy)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert isinstance(load_router(router_home_copy, strict=False), FallbackRouter)


def test_corrupted_metadata_and_dangling_pointer(router_home_copy):
    directory = current_dir(router_home_copy.router_dir)
    (directory / "metadata.json").write_text("{not json")
    with pytest.raises(MoseError, match="metadata.json is corrupted"):
        OnnxRouter.load(router_home_copy)
    (router_home_copy.router_dir / "current").write_text("v0042\n")
    with pytest.raises(MoseError, match="names 'v0042', which is not a version"):
        OnnxRouter.load(router_home_copy)
    with pytest.raises(MoseError, match="does not exist"):
        set_current(router_home_copy.router_dir, "v0042")
