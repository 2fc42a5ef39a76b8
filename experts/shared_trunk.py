"""Scoring one text under several LoRA experts with the unadapted lower layers run once.

A jury scores the same question + answer under k experts and the base model. When none of those
adapters touches layers ``0..L-1`` (the demo experts adapt only the top layers), every juror
computes the same hidden states up to layer ``L``: this runs that *trunk* once per distinct text,
then copies its output to one row per juror and runs only the adapted *branch* layers per row
(stacked per-row LoRA, :mod:`experts.batched_lora`). The system block every chat-formatted text
starts with (:func:`experts.chat.template_prefix`) is computed once per adapter and attended to
as a key/value cache (prefix caching, as in vLLM). For four jurors on short answers, with
adapters on the top third of the layers, that is less than half the plain forward passes' work,
and the result is the same.

Needs a Llama-style decoder (``model.model.{embed_tokens, layers, rotary_emb, norm}`` and
``lm_head``); :meth:`TrunkScorer.supports` says when, and the pool uses its plain path otherwise.
A scorer belongs to one set of loaded adapters (it keeps their LoRA layers and prefix caches):
the pool drops it when an adapter is added or removed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from experts import batched_lora
from experts.chat import BASE_ADAPTER, EncodedPair, left_pad

_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")
_PREFIX_CACHE_ENTRIES = 256
"""Adapters whose prefix keys/values are kept; each is ~1.5 MB for SmolLM2's 33-token prefix."""


def _run_layers(decoder: Any, hidden: Any, mask: Any, positions: Any, layers: Sequence[Any],
                cache: Any = None) -> Any:
    """``layers`` of ``decoder`` on ``hidden`` (left-padded rows; the 2-D ``mask`` also covers the
    tokens already in ``cache``, whose layers then gain this call's keys and values)."""
    from transformers.masking_utils import create_causal_mask

    if not layers:
        return hidden
    causal_mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask,
                                     past_key_values=cache, position_ids=positions,
                                     layer_idx=layers[0].self_attn.layer_idx)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                       position_ids=positions, past_key_values=cache, use_cache=cache is not None)
    return hidden


def shared_prefix_length(texts: Sequence[EncodedPair], prefix: Sequence[int]) -> int:
    """``len(prefix)`` when every text starts with ``prefix`` and keeps its answer and the
    position before it after it, else 0 (nothing cached)."""
    n = len(prefix)
    fits = all(len(t.input_ids) - t.answer_len - 1 >= n and t.input_ids[:n] == list(prefix) for t in texts)
    return n if fits else 0


class TrunkScorer:
    """Answer log-likelihoods of texts under several adapters of one peft model, sharing the
    unadapted layers per text and the common prefix per adapter."""

    def __init__(self, peft_model: Any, prefix: Sequence[int] = ()) -> None:
        self.peft_model = peft_model
        self.prefix = tuple(prefix)  # cached as keys/values: the chat template's fixed start
        self.lm = peft_model.base_model.model
        self.decoder = getattr(self.lm, "model", None)
        self.lora = batched_lora.lora_layers(peft_model)
        self.llama_style = hasattr(self.lm, "lm_head") and all(hasattr(self.decoder, part) for part in _PARTS)
        self._first_layer: dict[str, int] = {}
        self._prefixes: OrderedDict[tuple, list[tuple[Any, Any]]] = OrderedDict()

    def supports(self, keys: Sequence[str]) -> bool:
        """True when the model is a Llama-style decoder and the adapters allow stacked LoRA."""
        return self.llama_style and batched_lora.supported(self.peft_model, keys, self.lora)

    def first_adapted_layer(self, keys: Sequence[str]) -> int:
        """Index of the lowest decoder layer any adapter in ``keys`` changes (layer count if none)."""
        layers = self.decoder.layers
        for key in set(keys) - set(self._first_layer):
            self._first_layer[key] = next((i for i, layer in enumerate(layers)
                                           if any(key in getattr(m, "lora_A", {})
                                                  for m in batched_lora.lora_layers(layer))), len(layers))
        return min((self._first_layer[key] for key in keys), default=len(layers))

    def score(self, texts: Sequence[EncodedPair], keys_per_text: Sequence[Sequence[str]],
              pad_id: int) -> list[list[tuple[float, int]]]:
        """Per text, per adapter key: (sum of answer-token log-probs, answer-token count).

        Each text goes through the trunk once and through the branch once per key (``__base__``:
        no adapter), attending to the cached keys and values of the prefix all texts share.
        Call under ``torch.inference_mode()``.
        """
        import torch

        keys = [key for row in keys_per_text for key in row]
        split = self.first_adapted_layer(keys)
        device = next(self.lm.parameters()).device
        text_of_row = torch.tensor([i for i, row in enumerate(keys_per_text) for _ in row], device=device)

        shared = shared_prefix_length(texts, self.prefix)
        prefix = self.prefix[:shared]
        suffixes = [EncodedPair(t.input_ids[shared:], t.answer_len) for t in texts]
        ids, mask, positions = left_pad([t.input_ids for t in suffixes], pad_id)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device) + shared
        mask = torch.cat([torch.ones((len(texts), shared), dtype=mask.dtype, device=device), mask], dim=1)

        trunk_cache = self._cache(prefix, [BASE_ADAPTER] * len(texts), range(split))
        branch_cache = self._cache(prefix, keys, range(split, len(self.decoder.layers)))
        with batched_lora.AdaptersOff(self.lora):
            hidden = _run_layers(self.decoder, self.decoder.embed_tokens(ids), mask, positions,
                                 self.decoder.layers[:split], trunk_cache)
        with batched_lora.BatchedLoRA(self.peft_model, keys, self.lora):
            hidden = _run_layers(self.decoder, hidden[text_of_row], mask[text_of_row], positions[text_of_row],
                                 self.decoder.layers[split:], branch_cache)
        lengths = torch.tensor([texts[i].answer_len for i in text_of_row.tolist()], device=device)
        sums = self._answer_logprob_sums(hidden, ids[text_of_row], lengths)
        flat = iter(zip(sums.tolist(), lengths.tolist()))
        return [[next(flat) for _ in row] for row in keys_per_text]

    def _answer_logprob_sums(self, hidden: Any, ids: Any, lengths: Any) -> Any:
        """Sum of each row's answer-token log-probs, with the LM head (49k words wide) applied
        only at the positions that predict an answer token."""
        import torch

        keep = int(lengths.max())
        cols = torch.arange(keep, device=ids.device).unsqueeze(0)
        in_answer = cols >= (keep - lengths).unsqueeze(1)  # [rows, keep]
        before = hidden[:, -(keep + 1):-1, :][in_answer]  # position t predicts token t + 1
        logp = torch.log_softmax(self.lm.lm_head(self.decoder.norm(before)).float(), dim=-1)
        picked = logp.gather(-1, ids[:, -keep:][in_answer].unsqueeze(-1)).squeeze(-1)
        row_of = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand(-1, keep)[in_answer]
        return torch.zeros(len(ids), dtype=picked.dtype, device=ids.device).index_add_(0, row_of, picked)

    def _cache(self, prefix: tuple[int, ...], row_keys: Sequence[str], layers: Sequence[int]) -> Any:
        """A key/value cache holding ``prefix`` for each row under its adapter, in ``layers``."""
        from transformers.cache_utils import DynamicCache

        if not prefix or not layers:
            return None
        per_key = {key: self._prefix_kv(prefix, key) for key in dict.fromkeys(row_keys)}
        cache = DynamicCache(config=self.decoder.config)
        for index in layers:
            rows = [per_key[key][index] for key in row_keys]
            cache.update(_stack([k for k, _ in rows]), _stack([v for _, v in rows]), index)
        return cache

    def _prefix_kv(self, prefix: tuple[int, ...], key: str) -> list[tuple[Any, Any]]:
        """Per layer, the keys and values of ``prefix`` under adapter ``key``, computed once."""
        import torch
        from transformers.cache_utils import DynamicCache

        entry = (prefix, key)
        if entry in self._prefixes:
            self._prefixes.move_to_end(entry)
            return self._prefixes[entry]
        device = next(self.lm.parameters()).device
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        positions = torch.arange(len(prefix), device=device).unsqueeze(0)
        cache = DynamicCache(config=self.decoder.config)
        with batched_lora.BatchedLoRA(self.peft_model, [key], self.lora):
            _run_layers(self.decoder, self.decoder.embed_tokens(ids), torch.ones_like(ids), positions,
                        self.decoder.layers, cache)
        self._prefixes[entry] = [(layer.keys, layer.values) for layer in cache.layers]
        while len(self._prefixes) > _PREFIX_CACHE_ENTRIES:
            self._prefixes.popitem(last=False)
        return self._prefixes[entry]


def _stack(tensors: Sequence[Any]) -> Any:
    """[1, heads, length, dim] tensors -> [rows, heads, length, dim], without copies when all are one."""
    import torch

    first = tensors[0]
    if all(t is first for t in tensors):
        return first.expand(len(tensors), -1, -1, -1)
    return torch.cat(list(tensors), dim=0)
