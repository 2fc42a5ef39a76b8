"""Scoring one text under several LoRA experts with the unadapted lower layers run once.

A jury scores the same question + answer under k experts and the base model. When none of those
adapters touches layers ``0..L-1`` (the demo experts adapt only the top layers), every juror
computes the same hidden states up to layer ``L``: this runs that *trunk* once per distinct text,
then copies its output to one row per juror and runs only the adapted *branch* layers per row
(stacked per-row LoRA, :mod:`experts.batched_lora`). The system block every chat-formatted text
starts with (:func:`experts.chat.template_prefix`), or the whole prompt of texts scored without
their question (:func:`experts.chat.unconditional_prefix`), is computed once per adapter and
attended to as a key/value cache (prefix caching, as in vLLM). For four jurors on short answers, with
adapters on the top third of the layers, that is less than half the plain forward passes' work,
and the result is the same.

Optionally (``adapt_question=False``) the adapters apply only at the positions that predict an
answer token: the question then runs through the branch once, unadapted, and each juror's rows
attend to its keys and values, so only the answer is scored per juror (about 1.2x faster again
on short answers; other evidence than adapters on the whole text).

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
from experts.chat import BASE_ADAPTER, EncodedPair, answer_mean, left_pad

_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")
_PREFIX_CACHE_ENTRIES = 256
"""Adapters whose prefix keys/values are kept; each is ~1.1-1.3 MB for SmolLM2's 24- and 29-token prefixes."""


def run_layers(
    decoder: Any,
    hidden: Any,
    mask: Any,
    positions: Any,
    layers: Sequence[Any],
    cache: Any = None,
    capture: int | None = None,
) -> tuple[Any, Any]:
    """``layers`` of ``decoder`` on ``hidden`` (left-padded rows; the 2-D ``mask`` also covers the
    tokens already in ``cache``, whose layers then gain this call's keys and values): (output,
    the hidden states after the first ``capture`` of them, or None)."""
    from transformers.masking_utils import create_causal_mask

    captured = hidden if capture == 0 else None
    if not layers:
        return hidden, captured
    causal_mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=mask,
        past_key_values=cache,
        position_ids=positions,
        layer_idx=layers[0].self_attn.layer_idx,
    )
    position_embeddings = decoder.rotary_emb(hidden, position_ids=positions)
    for done, layer in enumerate(layers, start=1):
        hidden = layer(
            hidden,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        if done == capture:
            captured = hidden
    return hidden, captured


def shared_prefix_length(texts: Sequence[EncodedPair], prefix: Sequence[int]) -> int:
    """``len(prefix)`` when every text starts with ``prefix`` and keeps its answer and the
    position before it after it, else 0 (nothing cached)."""
    n = len(prefix)
    fits = all(len(t.input_ids) - t.answer_len - 1 >= n and t.input_ids[:n] == list(prefix) for t in texts)
    return n if fits else 0


class TrunkScorer:
    """Answer log-likelihoods of texts under several adapters of one peft model, sharing the
    unadapted layers per text and the common prefix per adapter."""

    def __init__(self, peft_model: Any, prefixes: Sequence[Sequence[int]] = ()) -> None:
        self.peft_model = peft_model
        # cached as keys/values, the longest one all texts of a pass start with
        self.prefixes = sorted({tuple(p) for p in prefixes if p}, key=len, reverse=True)
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
            self._first_layer[key] = next(
                (
                    i
                    for i, layer in enumerate(layers)
                    if any(key in getattr(m, "lora_A", {}) for m in batched_lora.lora_layers(layer))
                ),
                len(layers),
            )
        return min((self._first_layer[key] for key in keys), default=len(layers))

    def score(
        self,
        texts: Sequence[EncodedPair],
        keys_per_text: Sequence[Sequence[str]],
        pad_id: int,
        adapt_question: bool = True,
        state_layer: int | None = None,
    ) -> list[list[tuple[float, int, Any]]]:
        """Per text, per adapter key: (sum of answer-token log-probs, answer-token count, state).

        ``state_layer``: the state of each text's ``__base__`` row is its mean hidden state after
        that many decoder layers over the positions that predict an answer token (what
        :func:`experts.chat.answer_logprobs` returns with ``state_layer``); else, and for the
        other keys, None.

        Each text goes through the trunk once and through the branch once per key (``__base__``:
        no adapter), attending to the cached keys and values of the prefix all texts share.
        ``adapt_question=False``: the adapters apply only at the positions that predict an answer
        token; the rest of the text runs through the branch once, unadapted, and every key's rows
        attend to its keys and values (equal to :func:`experts.chat.answer_logprobs` under
        ``BatchedLoRA`` with :func:`answer_positions` as token mask).
        Call under ``torch.inference_mode()``.
        """
        import torch

        # branch rows (text, key) sorted by key: each adapter's rows are one slice (BatchedLoRA)
        rows = sorted(
            ((key, i, j) for i, row in enumerate(keys_per_text) for j, key in enumerate(row)), key=lambda r: r[0]
        )
        keys = [key for key, _, _ in rows]
        split = self.first_adapted_layer(keys)
        branch = range(split, len(self.decoder.layers))
        device = next(self.lm.parameters()).device
        row_text = torch.tensor([i for _, i, _ in rows], device=device)
        lengths = torch.tensor([t.answer_len for t in texts], device=device)
        row_lengths = lengths[row_text]

        prefix, ids, inputs, mask, positions = self._inputs(texts, pad_id)

        trunk_cache = self._cache(prefix, [BASE_ADAPTER] * len(texts), range(split))
        # state_layer within the trunk: every text's state is there, before any adapter
        trunk_state = state_layer if state_layer is not None and state_layer <= split else None
        branch_state = state_layer - split if state_layer is not None and trunk_state is None else None
        with batched_lora.AdaptersOff(self.lora):
            hidden, states = run_layers(
                self.decoder,
                self.decoder.embed_tokens(inputs),
                mask,
                positions,
                self.decoder.layers[:split],
                trunk_cache,
                trunk_state,
            )
        if adapt_question:
            cache, token_mask = self._cache(prefix, keys, branch), None
        else:
            cache, hidden, positions = self._unadapted_context(prefix, hidden, mask, positions, lengths, branch)
            cache = _select_rows(cache, row_text, branch, self.decoder.config)
            token_mask = answer_positions(row_lengths, hidden.shape[1])
        with batched_lora.BatchedLoRA(self.peft_model, keys, self.lora, token_mask):
            hidden, branch_states = run_layers(
                self.decoder,
                hidden[row_text],
                mask[row_text],
                positions[row_text],
                self.decoder.layers[split:],
                cache,
                branch_state,
            )
        keep = int(lengths.max())
        sums = self._answer_logprob_sums(hidden[:, -keep:], ids[row_text, -keep:], row_lengths)
        if branch_states is not None:
            states = [None] * len(texts)
            for r, (key, i, _) in enumerate(rows):
                if key == BASE_ADAPTER:
                    states[i] = branch_states[r]
        results: list[list[Any]] = [[None] * len(row) for row in keys_per_text]
        for (key, i, j), total, count in zip(rows, sums.tolist(), row_lengths.tolist()):
            state = states[i] if states is not None and key == BASE_ADAPTER else None
            results[i][j] = (total, count, answer_mean(state, count) if state is not None else None)
        return results

    def answer_states(self, texts: Sequence[EncodedPair], pad_id: int, layer: int) -> list[Any]:
        """Each text's base-model answer state after ``layer`` decoder layers (the ``state`` of a
        ``__base__`` row of :meth:`score`) without the layers above it or the LM head: the state
        alone costs ``layer / depth`` of a base-model pass and nothing per vocabulary word.
        Call under ``torch.inference_mode()``."""
        prefix, _, inputs, mask, positions = self._inputs(texts, pad_id)
        layers = range(min(layer, len(self.decoder.layers)))
        with batched_lora.AdaptersOff(self.lora):
            _, states = run_layers(
                self.decoder,
                self.decoder.embed_tokens(inputs),
                mask,
                positions,
                self.decoder.layers[: len(layers)],
                self._cache(prefix, [BASE_ADAPTER] * len(texts), layers),
                layer,
            )
        return [answer_mean(state, text.answer_len) for state, text in zip(states, texts)]

    def _inputs(self, texts: Sequence[EncodedPair], pad_id: int) -> tuple[tuple[int, ...], Any, Any, Any, Any]:
        """(cached prefix, left-padded ids after it, the ids layers run on, attention mask over
        prefix and inputs, positions): the last token predicts nothing scored, so no layer runs on it."""
        import torch

        device = next(self.lm.parameters()).device
        prefix = next((p for p in self.prefixes if shared_prefix_length(texts, p)), ())
        shared = len(prefix)
        ids, mask, positions = left_pad([t.input_ids[shared:] for t in texts], pad_id)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device) + shared
        mask = torch.cat([torch.ones((len(texts), shared), dtype=mask.dtype, device=device), mask], dim=1)
        return prefix, ids, ids[:, :-1], mask[:, :-1], positions[:, :-1]

    def _unadapted_context(
        self, prefix: tuple[int, ...], hidden: Any, mask: Any, positions: Any, lengths: Any, branch: range
    ) -> tuple[Any, Any, Any]:
        """Run the columns before the answer positions through the branch unadapted, once per text:
        (cache holding their keys and values after the prefix's, hidden and positions of the rest)."""
        from transformers.cache_utils import DynamicCache

        cache = self._cache(prefix, [BASE_ADAPTER] * len(hidden), branch) or DynamicCache(config=self.decoder.config)
        width = int(lengths.max())  # the answer-predicting columns of the longest answer
        if hidden.shape[1] > width:
            with batched_lora.AdaptersOff(self.lora):
                run_layers(
                    self.decoder,
                    hidden[:, :-width],
                    mask[:, :-width],
                    positions[:, :-width],
                    self.decoder.layers[branch.start :],
                    cache,
                )
        return cache, hidden[:, -width:], positions[:, -width:]

    def _answer_logprob_sums(self, hidden: Any, targets: Any, lengths: Any) -> Any:
        """Sum of each row's answer-token log-probs from the hidden states of the last ``keep``
        positions (each predicting the token of ``targets`` in the same column), with the LM head
        (49k words wide) applied only where an answer token is predicted."""
        import torch

        in_answer = answer_positions(lengths, targets.shape[1]).bool()
        logp = torch.log_softmax(self.lm.lm_head(self.decoder.norm(hidden[in_answer])).float(), dim=-1)
        picked = logp.gather(-1, targets[in_answer].unsqueeze(-1)).squeeze(-1)
        row_of = torch.arange(len(targets), device=targets.device).unsqueeze(1).expand_as(in_answer)[in_answer]
        return torch.zeros(len(targets), dtype=picked.dtype, device=targets.device).index_add_(0, row_of, picked)

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
            run_layers(
                self.decoder,
                self.decoder.embed_tokens(ids),
                torch.ones_like(ids),
                positions,
                self.decoder.layers,
                cache,
            )
        self._prefixes[entry] = [(layer.keys, layer.values) for layer in cache.layers]
        while len(self._prefixes) > _PREFIX_CACHE_ENTRIES:
            self._prefixes.popitem(last=False)
        return self._prefixes[entry]


def answer_positions(lengths: Any, width: int) -> Any:
    """[rows, width] 0/1 mask of the right-aligned columns that predict one of a row's
    ``lengths`` answer tokens (rows are left-padded, so every answer ends in the last column)."""
    import torch

    cols = torch.arange(width, device=lengths.device).unsqueeze(0)
    return (cols >= (width - lengths).unsqueeze(1)).to(torch.float32)


def _select_rows(cache: Any, rows: Any, layers: range, config: Any) -> Any:
    """A new cache whose row ``i`` is row ``rows[i]`` of ``cache``, in ``layers`` (None when
    ``cache`` holds nothing there)."""
    from transformers.cache_utils import DynamicCache

    if not layers or cache.get_seq_length(layers.start) == 0:
        return None
    out = DynamicCache(config=config)
    for index in layers:
        layer = cache.layers[index]
        out.update(layer.keys[rows], layer.values[rows], index)
    return out


def _stack(tensors: Sequence[Any]) -> Any:
    """[1, heads, length, dim] tensors -> [rows, heads, length, dim], without copies when all are one."""
    import torch

    first = tensors[0]
    if all(t is first for t in tensors):
        return first.expand(len(tensors), -1, -1, -1)
    return torch.cat(list(tensors), dim=0)
