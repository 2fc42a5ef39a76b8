"""Per-row decoding state: every row has its own adapter, sampling parameters, seed and stops.

Hugging Face ``generate`` takes one set of sampling parameters per call; the pool needs one per
request, so each row keeps its own :class:`RowState` and :func:`advance` samples its next token
from its own logits. The pool's engine loop (:mod:`experts.engine`) drives rows that join and
leave a running batch; :func:`decode` is the plain static-batch loop over the same row logic,
kept as the reference the engine's outputs are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from experts.chat import forward_kwargs, left_pad
from experts.sft_data import asked_words, brings_new_word
from experts.types import SamplingParams


@dataclass
class RowState:
    """Decoding state of one row."""

    params: SamplingParams
    generator: Any
    prompt_ids: Sequence[int] = ()
    """The prompt's tokens (the repetition penalty reads them)."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    """With ``params.logprobs``: per generated token (token, log-prob, [(alternative, log-prob)])."""
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None
    """With ``params.prompt_logprobs``: the same per prompt token (the first has no log-prob)."""
    asked: frozenset[str] | None = None
    """The question's words while ``params.echo_guard`` holds end-of-turn; None once the answer
    brings a word of its own (or when there is no question to guard against)."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


GREEDY_BELOW_TEMPERATURE = 1e-3
"""Temperatures below this decode greedily: ``softmax(logits / 1e-300)`` overflows to NaN, and a
NaN row would fail every request decoded in the same batch."""


def penalise(logits: Any, row: RowState) -> Any:
    """The row's logits with its repetition, presence and frequency penalties applied (the same
    tensor when none is set). Repetition: every token of the answer so far (and of the prompt with
    ``repetition_penalty_prompt``, as vLLM and Hugging Face), positive logits divided and negative
    ones multiplied by the penalty. Presence and frequency: subtracted once, and once per
    occurrence, for tokens of the answer (OpenAI)."""
    import torch

    params = row.params
    if not params.penalised:
        return logits
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        prompt = row.prompt_ids if params.repetition_penalty_prompt else ()
        seen = torch.tensor(sorted({*prompt, *row.token_ids}), dtype=torch.long, device=logits.device)
        if len(seen):
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
    if row.token_ids and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(row.token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def hold_echo(logits: Any, row: RowState, tokenizer: Any, eos_ids: set[int]) -> Any:
    """The row's logits with end-of-turn ruled out while its answer only restates the question
    (:attr:`RowState.asked` is set); the same tensor otherwise. The tokenizer's other special
    tokens are ruled out too: held at end-of-turn, a chat model would otherwise open the next
    turn (``<|im_start|>assistant``) inside its answer."""
    if row.asked is None:
        return logits
    held = sorted(eos_ids | set(getattr(tokenizer, "all_special_ids", ())))
    if not held:
        return logits
    logits = logits.clone()
    logits[held] = float("-inf")
    return logits


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


def new_row(params: SamplingParams, prompt_ids: Sequence[int] = (), question: str = "") -> RowState:
    """A row about to decode ``prompt_ids`` with ``params`` (its own random generator, seeded when
    asked); ``question``, the last user message, is what ``params.echo_guard`` guards against."""
    asked = asked_words(question) if params.echo_guard and question.strip() else None
    return RowState(params=params, generator=_generator(params.seed), prompt_ids=prompt_ids, asked=asked)


def advance(row: RowState, logits: Any, tokenizer: Any, eos_ids: set[int]) -> int:
    """Sample the row's next token from its logits, append it and apply end-of-turn, stop strings
    and the length limit; returns the token (fed to the next step unless the row is done). The
    penalties and the echo guard change what is sampled; recorded log-probs are the model's own."""
    token = _sample(hold_echo(penalise(logits, row), row, tokenizer, eos_ids), row.params, row.generator)
    row.token_ids.append(token)
    if row.params.logprobs is not None:
        _record_logprobs(row, logits, token)
    _apply_stops(row, tokenizer, eos_ids)
    if row.asked is not None and brings_new_word(row.asked, row.text, complete=row.done):
        row.asked = None
    del row.logprobs[len(row.token_ids) :]  # end-of-turn was dropped from the tokens
    return token


def _record_logprobs(row: RowState, logits: Any, token: int) -> None:
    """The log-softmax (float32) of the logits the token was sampled from: the token's value and
    the ``params.logprobs`` highest."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if row.params.logprobs:
        values, indices = torch.topk(logprobs, row.params.logprobs)
        top = list(zip(indices.tolist(), values.tolist()))
    row.logprobs.append((token, float(logprobs[token]), top))


def score_prompt(logits: Any, prompt: Sequence[int], k: int) -> list[tuple[int, float | None, list]]:
    """Each prompt token's log-prob (float32 log-softmax) given the tokens before it and the ``k``
    most likely tokens there; ``logits``: the prompt's positions, the last one aligned with the
    prompt's last token (left padding before it)."""
    import torch

    rows = logits[-len(prompt) : -1].float() if len(prompt) > 1 else logits[:0].float()
    logprobs = torch.log_softmax(rows, dim=-1)
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist() if len(prompt) > 1 else []
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k and chosen:
        values, indices = torch.topk(logprobs, k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [(prompt[0], None, [])] + [(token, value, top) for token, value, top in zip(prompt[1:], chosen, tops)]


def _byte_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTES: dict[str, int] | None = None


def token_piece(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token's text and its exact bytes (byte-level BPE tokens can hold part of a character)."""
    global _BYTES
    text = tokenizer.decode([token_id])
    raw = tokenizer.convert_ids_to_tokens(token_id)
    if _BYTES is None:
        _BYTES = _byte_table()
    if isinstance(raw, str) and raw and all(char in _BYTES for char in raw):
        return text, [_BYTES[char] for char in raw]
    return text, list(text.encode("utf-8"))


def result_logprobs(row: RowState, tokenizer: Any) -> list[Any] | None:
    """The row's recorded log-probabilities as :class:`~experts.types.TokenLogprob` entries
    (None when the row did not ask for them)."""
    return None if row.params.logprobs is None else as_entries(row.logprobs, tokenizer)


def as_entries(recorded: Sequence[tuple[int, float | None, list[tuple[int, float]]]], tokenizer: Any) -> list[Any]:
    """Recorded (token, log-prob, alternatives) as :class:`~experts.types.TokenLogprob` entries."""
    from experts.types import TokenLogprob, TopLogprob

    out = []
    for token, logprob, top in recorded:
        text, raw = token_piece(tokenizer, token)
        alternatives = []
        for other, value in top:
            other_text, other_raw = token_piece(tokenizer, other)
            alternatives.append(TopLogprob(token=other_text, logprob=value, bytes=other_raw))
        out.append(TokenLogprob(token=text, logprob=logprob, bytes=raw, top=alternatives))
    return out


def ready_text(row: RowState) -> str:
    """The part of the row's text that can be streamed now: all of it once the row is done;
    before, without a trailing partial UTF-8 character (decoded as U+FFFD) and without an ending
    that could still become a stop string (which would then be cut from the text)."""
    if row.done:
        return row.text
    text = row.text.rstrip("\ufffd")
    held = 0
    for stop in row.params.stop:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    return text[: len(text) - held]


def decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    adapter_names: Sequence[str] | None,
    eos_ids: set[int],
    pad_id: int,
    questions: Sequence[str] | None = None,
) -> Iterator[list[RowState]]:
    """Yield the row states after every decoding step until every row is done (a static batch:
    finished rows are fed padding until the last one ends). ``questions``: each row's last user
    message, for the echo guard (none: no row is guarded)."""
    import torch

    questions = questions or [""] * len(prompts)
    rows = [new_row(p, prompt, question) for p, prompt, question in zip(params, prompts, questions)]
    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_pad(prompts, pad_id))
    cache = None
    steps = max(p.max_new_tokens for p in params)
    with torch.inference_mode():
        for _ in range(steps):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **forward_kwargs(adapter_names),
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_ids = []
            for i, row in enumerate(rows):
                if row.done:
                    next_ids.append(pad_id)
                    continue
                next_ids.append(advance(row, logits[i], tokenizer, eos_ids))
            yield rows
            if all(r.done for r in rows):
                return
            ids = torch.tensor(next_ids, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
