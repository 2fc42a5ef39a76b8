"""LoRA training with the frozen lower layers run once per row.

The demo experts adapt only the top ``top_layers`` decoder layers. Every layer below them is
frozen and unadapted, so its output for a training row is the same in every epoch, and for
every expert trained on that row (the generalist of ``benchmarks/mixture.py`` reads the same
rows as the nine experts). :class:`TrunkCache` computes those hidden states once; each training
step then runs only the adapted layers, the final norm and the LM head on the answer positions.
On the 2-core CPU that is about 3.5x faster per epoch than a full forward and backward pass, and
the held-out loss curve costs a forward pass of the top layers only.

Rows are batched by length (shuffled within buckets of similar length), so little of a batch is
padding. On CPUs with bf16 instructions the forward and backward run under bf16 autocast when
the device policy asks for bf16 (LoRA weights and optimizer state stay float32).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from experts.chat import EncodedPair, left_pad
from experts.shared_trunk import answer_positions, run_layers

TRUNK_BATCH_TOKENS = 4096
"""Padded tokens per pass when filling the trunk cache."""


@dataclass
class CurvePoint:
    """Held-out answer loss after ``step`` optimizer steps (``tokens`` training tokens seen)."""

    step: int
    tokens: int
    heldout_loss: float


@dataclass
class TrainingRun:
    """What one adapter's training saw and measured."""

    train_losses: list[float] = field(default_factory=list)
    curve: list[CurvePoint] = field(default_factory=list)
    train_tokens: int = 0
    seconds: float = 0.0


def autocast(dtype: str | None) -> Any:
    """bf16 autocast on CPU when ``dtype`` is 'bfloat16', else a no-op context."""
    import torch

    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrunkCache:
    """Hidden states after the first ``split`` decoder layers, one [tokens, hidden] tensor per row."""

    def __init__(self, lm: Any, split: int, pad_id: int, dtype: str | None = None) -> None:
        self.lm, self.decoder, self.split, self.pad_id, self.dtype = lm, lm.model, split, pad_id, dtype
        self._states: dict[tuple[int, ...], Any] = {}

    def fill(self, rows: Sequence[EncodedPair], progress: bool = False, label: str = "trunk") -> None:
        """Compute the states of the rows not cached yet (length-sorted passes, no gradients)."""
        import torch
        from tqdm import tqdm

        missing = sorted({tuple(r.input_ids) for r in rows} - set(self._states), key=len)
        passes, current = [], []
        for ids in missing:
            if current and len(ids) * (len(current) + 1) > TRUNK_BATCH_TOKENS:
                passes.append(current)
                current = []
            current.append(ids)
        if current:
            passes.append(current)
        device = next(self.lm.parameters()).device
        with torch.inference_mode(), autocast(self.dtype):
            for chunk in tqdm(passes, desc=label, unit="pass", file=sys.stderr, disable=not progress):
                ids, mask, positions = (t.to(device) for t in left_pad(chunk, self.pad_id))
                hidden, _ = run_layers(
                    self.decoder, self.decoder.embed_tokens(ids), mask, positions, self.decoder.layers[: self.split]
                )
                for i, row in enumerate(chunk):
                    self._states[row] = hidden[i, -len(row) :].to(torch.float32).clone()

    def batch(self, rows: Sequence[EncodedPair]) -> tuple[Any, Any, Any, Any]:
        """Left-padded (trunk states, input ids, attention mask, positions) of ``rows``."""
        import torch

        ids, mask, positions = left_pad([r.input_ids for r in rows], self.pad_id)
        width = ids.shape[1]
        first = self._states[tuple(rows[0].input_ids)]
        hidden = torch.zeros((len(rows), width, first.shape[-1]), dtype=first.dtype)
        for i, row in enumerate(rows):
            hidden[i, width - len(row.input_ids) :] = self._states[tuple(row.input_ids)]
        device = next(self.lm.parameters()).device
        return hidden.to(device), ids.to(device), mask.to(device), positions.to(device)

    def answer_nll(self, rows: Sequence[EncodedPair]) -> tuple[Any, int]:
        """(summed answer-token NLL, answer-token count) of ``rows`` through the layers above the
        trunk as they are now (differentiable)."""
        import torch

        hidden, ids, mask, positions = self.batch(rows)
        with autocast(self.dtype):
            hidden, _ = run_layers(self.decoder, hidden, mask, positions, self.decoder.layers[self.split :])
            lengths = torch.tensor([r.answer_len for r in rows], device=ids.device)
            keep = int(lengths.max())
            in_answer = answer_positions(lengths, keep).bool()
            predicting = hidden[:, -keep - 1 : -1][in_answer]
            logits = self.lm.lm_head(self.decoder.norm(predicting)).float()
        targets = ids[:, -keep:][in_answer]
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), int(lengths.sum())

    def mean_nll(self, rows: Sequence[EncodedPair], batch_size: int = 16) -> float:
        """Token-weighted mean answer NLL of ``rows`` (no gradients)."""
        import torch

        total, count = 0.0, 0
        ordered = sorted(rows, key=lambda r: len(r.input_ids))
        with torch.inference_mode():
            for start in range(0, len(ordered), batch_size):
                nll, n = self.answer_nll(ordered[start : start + batch_size])
                total, count = total + float(nll), count + n
        return total / max(count, 1)


def length_batches(
    rows: Sequence[EncodedPair], batch_size: int, epochs: int, seed: int, bucket: int = 16
) -> list[list[int]]:
    """Seeded batches of row indices over ``epochs``: each epoch shuffled, cut into buckets of
    ``bucket`` batches, length-sorted within a bucket, and the batches shuffled again."""
    rng = random.Random(seed)
    batches: list[list[int]] = []
    for _ in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        epoch = []
        span = batch_size * bucket
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: len(rows[i].input_ids))
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        batches += epoch
    return batches


def curve_steps(total: int, points: int) -> set[int]:
    """``points`` evaluation steps spread over ``total`` steps (0 and ``total`` included)."""
    if points <= 1 or total == 0:
        return {0, total}
    return {round(total * i / (points - 1)) for i in range(points)}


def lr_factor(step: int, steps: int, decay: bool) -> float:
    """The share of the peak learning rate at ``step`` of ``steps``: a linear warm-up over the first
    5 % of steps, then a linear decay to a tenth (``decay``) or the peak held to the end."""
    warmup = max(1, steps // 20)
    if step < warmup or not decay:
        return min((step + 1) / warmup, 1.0)
    return max(0.1, (steps - step) / max(1, steps - warmup))


def train_cached(
    peft_model: Any,
    trunk: TrunkCache,
    train: Sequence[EncodedPair],
    heldout: Sequence[EncodedPair],
    *,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    seed: int,
    decay: bool = True,
    max_steps: int | None = None,
    curve_points: int = 2,
    progress: bool = True,
    label: str = "finetune",
) -> TrainingRun:
    """Train ``peft_model``'s LoRA weights (above the trunk) on ``train``; the held-out loss is
    measured at ``curve_points`` steps (step 0 is the base model: LoRA starts as the identity).
    The learning rate warms up over the first 5 % of steps, then either decays linearly to a tenth
    of ``learning_rate`` (``decay``) or holds it (:func:`lr_factor`)."""
    import torch
    from tqdm import tqdm

    run = TrainingRun()
    started = time.perf_counter()
    trunk.fill(list(train) + list(heldout), progress, label=f"{label} trunk")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    batches = length_batches(train, batch_size, epochs, seed)[:max_steps]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, len(batches), decay))
    evaluate_at = curve_steps(len(batches), curve_points) if heldout else set()
    peft_model.train()
    bar = tqdm(total=len(batches), desc=label, unit="step", file=sys.stderr, disable=not progress)
    for step in range(len(batches) + 1):
        if step in evaluate_at:
            peft_model.eval()
            run.curve.append(CurvePoint(step, run.train_tokens, round(trunk.mean_nll(heldout), 4)))
            peft_model.train()
        if step == len(batches):
            break
        rows = [train[i] for i in batches[step]]
        nll, count = trunk.answer_nll(rows)
        loss = nll / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        run.train_losses.append(float(loss.detach()))
        run.train_tokens += sum(len(r.input_ids) for r in rows)
        bar.update(1)
        bar.set_postfix(loss=f"{run.train_losses[-1]:.3f}")
    bar.close()
    peft_model.eval()
    run.seconds = time.perf_counter() - started
    return run


def take_tokens(rows: Sequence[EncodedPair], budget: int | None) -> list[EncodedPair]:
    """The leading rows whose tokens add up to ``budget`` (all rows when None)."""
    if budget is None:
        return list(rows)
    taken, used = [], 0
    for row in rows:
        if used >= budget:
            break
        taken.append(row)
        used += len(row.input_ids)
    return taken
