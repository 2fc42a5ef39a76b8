"""Batched decoding where every row has its own adapter, sampling parameters, seed and stops.

Hugging Face ``generate`` takes one set of sampling parameters per call; the pool needs one per
request, so this is a small KV-cached loop: one forward pass per step for the whole batch
(peft's ``adapter_names`` picks each row's adapter), then per-row sampling. It is a generator
so that streaming a single request and batched generation share the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from experts.chat import forward_kwargs, left_pad
from experts.types import SamplingParams


@dataclass
class RowState:
    """Decoding state of one row."""

    params: SamplingParams
    generator: Any
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


GREEDY_BELOW_TEMPERATURE = 1e-3
"""Temperatures below this decode greedily: ``softmax(logits / 1e-300)`` overflows to NaN, and a
NaN row would fail every request decoded in the same batch."""


def _sample(logits: Any, params: SamplingParams, generator: Any) -> int:
    import torch

    if params.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _generator(seed: int | None) -> Any:
    import torch

    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _apply_stops(row: RowState, tokenizer: Any, eos_ids: set[int]) -> None:
    """Update ``row.text`` and finish the row on end-of-turn, a stop string or the length limit."""
    last = row.token_ids[-1]
    if last in eos_ids:
        row.token_ids.pop()
        row.finish_reason = "stop"
    row.text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
    for stop in row.params.stop:
        cut = row.text.find(stop)
        if cut >= 0:
            row.text = row.text[:cut]
            row.finish_reason = "stop"
    if not row.done and len(row.token_ids) >= row.params.max_new_tokens:
        row.finish_reason = "length"


def decode(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
           adapter_names: Sequence[str] | None, eos_ids: set[int], pad_id: int) -> Iterator[list[RowState]]:
    """Yield the row states after every decoding step until every row is done."""
    import torch

    rows = [RowState(params=p, generator=_generator(p.seed)) for p in params]
    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_pad(prompts, pad_id))
    cache = None
    steps = max(p.max_new_tokens for p in params)
    with torch.inference_mode():
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1, **forward_kwargs(adapter_names))
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_ids = []
            for i, row in enumerate(rows):
                if row.done:
                    next_ids.append(pad_id)
                    continue
                token = _sample(logits[i], row.params, row.generator)
                row.token_ids.append(token)
                _apply_stops(row, tokenizer, eos_ids)
                next_ids.append(token)
            yield rows
            if all(r.done for r in rows):
                return
            ids = torch.tensor(next_ids, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
