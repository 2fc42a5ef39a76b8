"""Scoring one text under several LoRA experts with the unadapted lower layers run once.

A jury scores the same question + answer under k experts and the base model. When none of those
adapters touches layers ``0..L-1`` (the demo experts adapt only the top layers), every juror
computes the same hidden states up to layer ``L``: this runs that *trunk* once per distinct text,
then copies its output to one row per juror and runs only the adapted *branch* layers per row
(stacked per-row LoRA, :mod:`experts.batched_lora`). For four jurors and adapters on the top
third of the layers that halves the compute, and the result equals the plain forward pass.

Needs a Llama-style decoder (``model.model.{embed_tokens, layers, rotary_emb, norm}`` and
``lm_head``); :func:`supported` says when, and the pool uses its plain path otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experts import batched_lora
from experts.chat import EncodedPair, answer_token_logprobs, left_pad

_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")


def _causal_lm(peft_model: Any) -> Any:
    return peft_model.base_model.model


def supported(peft_model: Any, keys: Sequence[str]) -> bool:
    """True when the shared model is a Llama-style decoder and the adapters allow stacked LoRA."""
    if peft_model is None or not batched_lora.supported(peft_model, keys):
        return False
    lm = _causal_lm(peft_model)
    return hasattr(lm, "lm_head") and all(hasattr(getattr(lm, "model", None), part) for part in _PARTS)


def first_adapted_layer(peft_model: Any, keys: Sequence[str]) -> int:
    """Index of the lowest decoder layer that any adapter in ``keys`` changes (layer count if none)."""
    layers = _causal_lm(peft_model).model.layers
    wanted = set(keys)
    for index, layer in enumerate(layers):
        if any(wanted & set(getattr(m, "lora_A", {})) for m in batched_lora.lora_layers(layer)):
            return index
    return len(layers)


def _run_layers(decoder: Any, hidden: Any, mask: Any, positions: Any, layers: Sequence[Any]) -> Any:
    """``layers`` of ``decoder`` on ``hidden`` (left-padded rows, 2-D ``mask``)."""
    from transformers.masking_utils import create_causal_mask

    if not layers:
        return hidden
    causal_mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask,
                                     past_key_values=None, position_ids=positions)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                       position_ids=positions, past_key_values=None, use_cache=False)
    return hidden


def score_shared(peft_model: Any, texts: Sequence[EncodedPair], keys_per_text: Sequence[Sequence[str]],
                 pad_id: int) -> list[list[tuple[float, int]]]:
    """Per text, per adapter key: (sum of answer-token log-probs, answer-token count).

    Each text goes through the trunk once and through the branch once per key; ``__base__`` as a
    key means no adapter. Call under ``torch.inference_mode()``.
    """
    import torch

    all_keys = [key for keys in keys_per_text for key in keys]
    lm = _causal_lm(peft_model)
    decoder = lm.model
    split = first_adapted_layer(peft_model, all_keys)
    ids, mask, positions = left_pad([t.input_ids for t in texts], pad_id)
    device = next(lm.parameters()).device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    with peft_model.disable_adapter():
        hidden = _run_layers(decoder, decoder.embed_tokens(ids), mask, positions, decoder.layers[:split])
    rows = torch.tensor([i for i, keys in enumerate(keys_per_text) for _ in keys], device=device)
    with batched_lora.BatchedLoRA(peft_model, all_keys):
        hidden = _run_layers(decoder, hidden[rows], mask[rows], positions[rows], decoder.layers[split:])
    keep = max(t.answer_len for t in texts)
    logits = lm.lm_head(decoder.norm(hidden[:, -(keep + 1):, :]))
    expanded = [texts[i] for i in rows.tolist()]
    sums, counts = answer_token_logprobs(logits, ids[rows], expanded)
    out: list[list[tuple[float, int]]] = []
    flat = iter(zip(sums.tolist(), counts.tolist()))
    for keys in keys_per_text:
        out.append([next(flat) for _ in keys])
    return out
