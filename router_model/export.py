"""Export a trained router to ONNX and write it as a new artifact version.

One graph takes ``input_ids`` and ``attention_mask`` (int64, dynamic batch and length) and
returns ``probs`` (calibrated: the temperature is inside the graph). The fp32 graph is checked
against the torch model; an int8 dynamically quantised copy is kept, and used by the runtime,
only when it loses at most ``quantize_tolerance`` validation accuracy and is faster.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from registry.errors import MoseError
from router_model.artifact import (
    HELDOUT_ROWS,
    ONNX_FP32,
    ONNX_INT8,
    TRAIN_ROWS,
    VALIDATION_ROWS,
    RouterMetadata,
    publish,
    staging_dir,
)
from router_model.config import RouterConfig
from router_model.data import LabelledQuery, TrainingData, rows_sha256, write_jsonl
from router_model.model import RouterNet, run_batched, save
from router_model.runtime import choose_providers, open_session
from router_model.tokens import encode, length_sorted_batches, load_tokenizer, minilm_dir, pad
from router_model.train import TrainedRouter, log

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "probs"
SUPPORT_NAME = "support"
OPSET = 18


def export_onnx(net: RouterNet, path: Path) -> None:
    """Write the whole path (token ids -> calibrated probabilities) as one self-contained graph."""
    import warnings

    net.eval()
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2, max=512)
    sample = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            sample,
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME, SUPPORT_NAME],
            dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )


def quantize_int8(source: Path, target: Path) -> None:
    """int8 dynamic quantisation of the MatMul weights (activations quantised at run time)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # it warns about pre-processing on every call
    model = onnx.load(str(source))
    # The exporter's value_info annotations trip the quantiser's shape inference (a transposed
    # head weight); they are optional, so re-infer from scratch.
    del model.graph.value_info[:]
    # MatMul weights only, per output channel: the embedding and lexical-bag tables stay fp32
    # (per-tensor int8 on everything measured -0.5 pt accuracy; this measured none).
    quantize_dynamic(model, str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True)


def onnx_probs(session, token_ids: Sequence[Sequence[int]], batch_size: int = 64) -> np.ndarray:
    """Probabilities for every row (input order) from an ONNX Runtime session."""
    rows = []
    for index in length_sorted_batches(token_ids, batch_size):
        input_ids, mask = pad([token_ids[i] for i in index])
        rows.append((index, session.run([OUTPUT_NAME], {"input_ids": input_ids, "attention_mask": mask})[0]))
    out = np.zeros((len(token_ids), rows[0][1].shape[1]), dtype=np.float32)
    for index, probs in rows:
        out[index] = probs
    return out


def timed_probs(session, token_ids) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    probs = onnx_probs(session, token_ids)
    return probs, time.perf_counter() - started


def check_and_quantize(
    net: RouterNet,
    staging: Path,
    validation: Sequence[LabelledQuery],
    labels: list[str],
    config: RouterConfig,
    require_speedup: bool = True,
) -> dict:
    """Compare ONNX with torch on the validation rows, try int8; returns export metrics incl.
    ``onnx_file`` (the graph the runtime should use). int8 is kept when it loses at most
    ``quantize_tolerance`` validation accuracy and (with ``require_speedup``) runs faster."""
    tokenizer = load_tokenizer(staging, config.max_length)
    token_ids = encode(tokenizer, [row.query for row in validation])
    gold = np.array([labels.index(row.domain) if row.domain in labels else -1 for row in validation])
    torch_probs = run_batched(net.probabilities, token_ids)
    fp32 = open_session(staging / ONNX_FP32, choose_providers(use_cuda=False), config.threads)
    fp32_probs, fp32_seconds = timed_probs(fp32, token_ids)
    max_diff = float(np.abs(fp32_probs - torch_probs).max())
    if max_diff > 1e-4:
        raise MoseError(f"ONNX export differs from the torch model by {max_diff:.2e} (> 1e-4): please report this bug")
    metrics = {
        "onnx_max_abs_diff": max_diff,
        "val_accuracy_fp32": float((fp32_probs.argmax(1) == gold).mean()),
        "onnx_file": ONNX_FP32,
    }
    if config.quantize:
        quantize_int8(staging / ONNX_FP32, staging / ONNX_INT8)
        int8_probs, int8_seconds = timed_probs(
            open_session(staging / ONNX_INT8, choose_providers(use_cuda=False), config.threads), token_ids
        )
        metrics["val_accuracy_int8"] = float((int8_probs.argmax(1) == gold).mean())
        metrics["int8_speedup"] = round(fp32_seconds / max(int8_seconds, 1e-9), 2)
        keep = metrics["val_accuracy_fp32"] - metrics["val_accuracy_int8"] <= config.quantize_tolerance and (
            int8_seconds < fp32_seconds or not require_speedup
        )
        if keep:
            metrics["onnx_file"] = ONNX_INT8
        else:
            (staging / ONNX_INT8).unlink()
        log(
            f"int8: validation accuracy {metrics['val_accuracy_int8']:.4f} vs fp32 {metrics['val_accuracy_fp32']:.4f}, "
            f"speed-up x{metrics['int8_speedup']}: {'kept' if keep else 'dropped'}"
        )
    return metrics


def write_artifact(
    router_dir: Path,
    trained: TrainedRouter,
    data: TrainingData,
    config: RouterConfig,
    parent: str | None = None,
    added_domains: Sequence[str] = (),
    require_speedup: bool = True,
    check_rows: int | None = None,
) -> Path:
    """Export, verify, quantise and publish a new version; returns its directory. ``check_rows``
    limits the validation rows the ONNX/int8 checks run on (incremental updates: speed)."""
    staging = staging_dir(router_dir)
    try:
        (staging / "tokenizer.json").write_bytes((minilm_dir() / "tokenizer.json").read_bytes())
        save(trained.net, staging)
        export_onnx(trained.net, staging / ONNX_FP32)
        export_metrics = check_and_quantize(
            trained.net, staging, data.validation[:check_rows], trained.labels, config, require_speedup
        )
        hashes = {
            TRAIN_ROWS: write_jsonl(data.train, staging / TRAIN_ROWS),
            VALIDATION_ROWS: write_jsonl(data.validation, staging / VALIDATION_ROWS),
            HELDOUT_ROWS: write_jsonl(data.heldout, staging / HELDOUT_ROWS),
        }
        onnx_file = export_metrics.pop("onnx_file")
        metadata = RouterMetadata(
            parent=parent,
            labels=trained.labels,
            experts=data.experts,
            added_domains=list(added_domains),
            temperature=float(trained.net.temperature),
            threshold=trained.threshold,
            min_support=trained.min_support,
            fine_tuned=trained.fine_tuned,
            onnx_file=onnx_file,
            quantized=onnx_file == ONNX_INT8,
            config=config.model_dump(),
            metrics={**trained.metrics, **export_metrics},
            data={
                "files": data.files,
                "rows": {
                    name: len(rows)
                    for name, rows in (
                        (TRAIN_ROWS, data.train),
                        (VALIDATION_ROWS, data.validation),
                        (HELDOUT_ROWS, data.heldout),
                    )
                },
                "rows_sha256": {TRAIN_ROWS: rows_sha256(data.train)},
                "files_sha256": hashes,
            },
        )
        return publish(router_dir, staging, metadata)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
