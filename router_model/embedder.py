"""Sentence embeddings with the packaged all-MiniLM-L6-v2: the router's baselines, the mixture
benchmark's answer similarity and the jury's own-answer agreement all use this one embedder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class MiniLMEmbedder:
    """Normalised mean-pooled all-MiniLM-L6-v2 sentence embeddings, ``embedder(texts) -> array``.

    The encoder loads on the first call and stays loaded: a verdict with own answers embeds five
    short texts, which takes less time than loading MiniLM again would."""

    def __init__(self, max_length: int = 128, progress: str | None = None) -> None:
        self.max_length = max_length
        self.progress = progress
        self._encoder = self._tokenizer = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from router_model.model import load_encoder, run_batched
        from router_model.tokens import encode, load_tokenizer, minilm_dir

        if self._encoder is None:
            self._encoder = load_encoder(6).eval()
            self._tokenizer = load_tokenizer(minilm_dir(), self.max_length)
        return run_batched(self._embed, encode(self._tokenizer, list(texts)), progress=self.progress)

    def _embed(self, input_ids, mask):  # run_batched runs it without gradients
        import torch

        hidden = self._encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)
