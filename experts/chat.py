"""Chat formatting and answer log-likelihoods, shared by the pool, scoring and fine-tuning.

A question/answer pair is encoded as ``chat_template([user: question], generation prompt)``
followed by the answer tokens and the end-of-turn token. Fine-tuning loss, held-out loss and
likelihood scoring all use the same encoding and the same :func:`answer_logprobs`, so their
numbers are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one prompt + answer; ``answer_len`` trailing ids are the scored answer."""

    input_ids: list[int]
    answer_len: int


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and the assistant header."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def template_prefix(tokenizer: Any) -> list[int]:
    """The token ids every single-turn chat prompt starts with (SmolLM2: the default system block
    and the user header): the part of a scored text that is the same for every question."""
    a = prompt_ids(tokenizer, [{"role": "user", "content": ""}])
    b = prompt_ids(tokenizer, [{"role": "user", "content": "?"}])
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return a[:length]


def unconditional_prefix(tokenizer: Any) -> list[int]:
    """The prompt of a text scored without its question (:func:`encode_pair` with ``None``), less
    its last token, which predicts the answer's first token: what all those texts start with."""
    return prompt_ids(tokenizer, [{"role": "user", "content": ""}])[:-1]


def end_of_turn(tokenizer: Any) -> str:
    return tokenizer.eos_token or "<|im_end|>"


def encode_pair(tokenizer: Any, question: str | None, answer: str, max_tokens: int) -> EncodedPair:
    """Encode a pair, truncated to ``max_tokens`` (question == None: the unconditional prompt).

    The answer keeps at least half the budget; the prompt is cut from the left (it ends with the
    assistant header, which must stay next to the answer).
    """
    messages = [{"role": "user", "content": question if question is not None else ""}]
    prompt = prompt_ids(tokenizer, messages)
    answer_ids = tokenizer(answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[: max(1, max_tokens - min(len(prompt), max_tokens // 2))]
    prompt = prompt[-max(1, max_tokens - len(answer_ids)) :]
    return EncodedPair(input_ids=list(prompt) + list(answer_ids), answer_len=len(answer_ids))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def forward_kwargs(adapter_names: Sequence[str] | None) -> dict:
    """Extra forward arguments: peft's per-row adapter selection, only when adapters are in play."""
    return {"adapter_names": list(adapter_names)} if adapter_names is not None else {}


def answer_logprobs(
    model: Any,
    pairs: Sequence[EncodedPair],
    pad_id: int,
    adapter_names: Sequence[str] | None = None,
    state_layer: int | None = None,
):
    """Per-row (sum of answer-token log-probs, answer-token count), one forward pass.

    Rows are left-padded so every answer ends at the last position; only the last
    ``max(answer_len)`` logits are computed (the LM head is a large part of the cost).
    Differentiable: fine-tuning uses it for its loss. ``state_layer``: a third value, each row's
    mean hidden state after that many decoder layers over the positions that predict its answer
    tokens (the answer as the model has read it; the jury's truthfulness probe reads it).
    """
    out, ids = _answer_forward(model, pairs, pad_id, adapter_names, hidden_states=state_layer is not None)
    sums, counts = answer_token_logprobs(out.logits, ids, pairs)
    if state_layer is None:
        return sums, counts
    hidden = out.hidden_states[state_layer][:, :-1]  # the last position predicts nothing scored
    return sums, counts, [answer_mean(hidden[i], p.answer_len) for i, p in enumerate(pairs)]


def _answer_forward(
    model: Any, pairs: Sequence[EncodedPair], pad_id: int, adapter_names: Sequence[str] | None, hidden_states=False
):
    """(model output, left-padded ids) of one forward pass over ``pairs``, computing logits only
    for the last ``max(answer_len) + 1`` positions (the LM head is a large part of the cost)."""
    ids, mask, positions = left_pad([p.input_ids for p in pairs], pad_id)
    device = next(model.parameters()).device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        logits_to_keep=max(p.answer_len for p in pairs) + 1,
        output_hidden_states=hidden_states,
        **forward_kwargs(adapter_names),
    )
    return out, ids


def answer_mean(state: Any, count: int) -> Any:
    """Mean of the last ``count`` columns of one row's [width, hidden] states: the positions that
    predict its answer tokens (rows are left-padded and end where their answer ends). The one
    pooling of the answer state, on every scoring path."""
    return state[-count:].float().mean(dim=0)


def answer_token_logprobs(logits: Any, ids: Any, pairs: Sequence[EncodedPair]):
    """(sum of answer-token log-probs, answer-token count) per row from the last ``keep + 1``
    positions' logits of left-padded rows (``keep`` = the longest answer)."""
    logp, answer_mask, lengths = _gathered_logprobs(logits, ids, pairs)
    return (logp * answer_mask).sum(-1), lengths


def _gathered_logprobs(logits: Any, ids: Any, pairs: Sequence[EncodedPair]):
    """([rows, keep] log-prob of each scored position's actual token, the mask of answer tokens,
    each row's answer length) for left-padded rows."""
    import torch

    keep = max(p.answer_len for p in pairs)
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # position t predicts token t+1
    logp = logp.gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)
    lengths = torch.tensor([p.answer_len for p in pairs], device=ids.device)
    cols = torch.arange(keep, device=ids.device).unsqueeze(0)
    return logp, cols >= (keep - lengths).unsqueeze(1), lengths


def answer_token_logprob_rows(
    model: Any, pairs: Sequence[EncodedPair], pad_id: int, adapter_names: Sequence[str] | None = None
) -> list[list[float]]:
    """Each row's answer-token log-probs in order (teacher-forced, one forward pass): what a
    per-token mixture of several models' next-token distributions is computed from."""
    out, ids = _answer_forward(model, pairs, pad_id, adapter_names)
    logp, answer_mask, _ = _gathered_logprobs(out.logits, ids, pairs)
    return [row[mask].tolist() for row, mask in zip(logp, answer_mask)]
