"""Train the router: head-only and/or fine-tuned encoder, chosen on validation accuracy;
then temperature scaling and the abstain threshold on the validation rows.

Head-only trains the linear head and the lexical bag on frozen mean-pooled embeddings.
Fine-tuning starts from that head (linear probing, then fine-tuning: the pretrained features are
not wrecked by a random head) and trains the top ``tune_layers`` encoder layers, head and bag
with AdamW for ``epochs`` passes over length-bucketed batches, keeping the epoch with the best
validation accuracy. The frozen part (embeddings and lower layers) runs once; its outputs are
cached, so a step costs only the trained layers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from router_model.calibration import choose_threshold, expected_calibration_error, fit_temperature, softmax
from router_model.config import RouterConfig
from router_model.data import TrainingData
from router_model.model import RouterNet, build, run_layers
from router_model.tokens import encode, length_sorted_batches, load_tokenizer, minilm_dir, pad


@dataclass
class TrainedRouter:
    """A trained, calibrated router net and what was measured while training it."""

    net: RouterNet
    labels: list[str]
    threshold: float
    fine_tuned: bool
    min_support: float = 0.0
    metrics: dict = field(default_factory=dict)


@contextlib.contextmanager
def seeded_training(seed: int, threads: int) -> Iterator[None]:
    """Seed every generator and train on ``threads`` torch threads (0: :func:`auto_threads`); the
    process's own thread count comes back afterwards (``mose up`` scores the jury next in the same
    process, and a server updates its router beside the experts it serves)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or auto_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


OTHERS_BUSY_CORES = 0.5
"""Other processes using more than this many cores make training run on one thread."""


def auto_threads(window_s: float = 0.5, measure: Callable[[float], tuple[float, float]] | None = None) -> int:
    """All cores when other processes leave them free; one when others keep them busy (threads
    that wait on each other at every op lose more than they gain when they only get slices of a
    core). Only other processes count: the load average also holds this process's own recent
    work, and read after ``mose up`` trained the experts it made the router train on one core of
    two (about 1.8x slower). ``measure``: :func:`busy_cores` unless given."""
    total, own = (measure or busy_cores)(window_s)
    return (os.cpu_count() or 1) if total - own < OTHERS_BUSY_CORES else 1


def busy_cores(window_s: float) -> tuple[float, float]:
    """Cores kept busy over the next ``window_s`` seconds: by every process, and by this one."""
    import psutil

    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None)
    time.sleep(window_s)
    total = psutil.cpu_percent(None) / 100 * (os.cpu_count() or 1)
    return total, me.cpu_percent(None) / 100


def log(message: str) -> None:
    print(f"[router] {message}", file=sys.stderr, flush=True)


def train_router(data: TrainingData, config: RouterConfig, progress: bool = True) -> TrainedRouter:
    """Fit, choose, calibrate. Never looks at ``data.heldout``."""
    with seeded_training(config.seed, config.threads):
        return _fit(data, config, progress)


def _fit(data: TrainingData, config: RouterConfig, progress: bool) -> TrainedRouter:
    started = time.perf_counter()
    labels = data.labels
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = load_tokenizer(minilm_dir(), config.max_length)
    y_train = torch.tensor([index[row.domain] for row in data.train])
    y_val = np.array([index[row.domain] for row in data.validation])
    net = build(len(labels), config.encoder_layers, config.seed).eval()
    log(f"{len(data.train)} training rows, {len(data.validation)} validation rows, {len(labels)} labels")

    # Everything below `split` stays frozen in both modes: run it once, cache its outputs.
    split = max(0, config.encoder_layers - config.tune_layers)
    desc = "encoding (frozen layers)" if progress else None
    train = Cached.build(net, encode(tokenizer, [row.query for row in data.train]), split, desc)
    val = Cached.build(net, encode(tokenizer, [row.query for row in data.validation]), split)
    pretrained_upper = copy.deepcopy(net.encoder.encoder.layer.state_dict())
    fit_head(net, train.embeddings(net), train.tokens, y_train, config)
    head_state = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("head.", "bag."))}
    head_val_acc = accuracy(val.logits(net).numpy(), y_val)
    log(f"head only: validation accuracy {head_val_acc:.4f}")
    metrics: dict = {"val_accuracy_head_only": head_val_acc}

    fine_tuned = False
    if config.fine_tune in ("auto", "yes"):
        tuned_acc = fine_tune(net, train, y_train, val, y_val, config, progress)
        metrics["val_accuracy_fine_tuned"] = tuned_acc
        fine_tuned = config.fine_tune == "yes" or tuned_acc > head_val_acc
        if not fine_tuned:
            net.encoder.encoder.layer.load_state_dict(pretrained_upper)
            net.load_state_dict(head_state, strict=False)
    log(f"choice: {'fine-tuned encoder' if fine_tuned else 'head only'}")

    net.eval()
    val_logits = val.logits(net).numpy()
    temperature = fit_temperature(val_logits, y_val)
    net.temperature.fill_(temperature)
    raw = softmax(val_logits)
    train_emb, val_emb = train.embeddings(net), val.embeddings(net)
    min_support, val_support = set_centroids(net, train_emb, y_train, val_emb, len(labels), config)
    log(f"out-of-distribution guard: min support {min_support:.3f}")
    calibrated, memory_metrics = fit_memory(
        net, train_emb, y_train, val_emb, softmax(val_logits, temperature), y_val, config
    )
    metrics.update(memory_metrics)
    correct = calibrated.argmax(1) == y_val
    threshold = choose_threshold(calibrated.max(1), correct, config.target_precision, config.min_threshold)
    answered = (calibrated.max(1) >= threshold) & (val_support >= min_support)
    metrics.update(
        {
            "val_accuracy": float(correct.mean()),
            "val_ece_uncalibrated": expected_calibration_error(raw.max(1), raw.argmax(1) == y_val),
            "val_ece": expected_calibration_error(calibrated.max(1), correct),
            "val_abstain_rate": float(1 - answered.mean()),
            "val_accuracy_with_abstention": float((correct & answered).mean()),
            "val_precision_answered": float(correct[answered].mean()) if answered.any() else 0.0,
            "train_seconds": round(time.perf_counter() - started, 1),
            "n_train": len(data.train),
            "n_validation": len(data.validation),
        }
    )
    log(
        f"temperature {temperature:.3f}, threshold {threshold:.3f}, validation ECE "
        f"{metrics['val_ece_uncalibrated']:.4f} -> {metrics['val_ece']:.4f}, {metrics['train_seconds']} s"
    )
    return TrainedRouter(
        net=net, labels=labels, threshold=threshold, fine_tuned=fine_tuned, min_support=min_support, metrics=metrics
    )


@torch.no_grad()
def set_centroids(
    net, train_emb: torch.Tensor, y_train, val_emb: torch.Tensor, num_labels, config
) -> tuple[float, np.ndarray]:
    """Store each label's normalised mean training embedding; return the support threshold
    (``support_quantile`` of the validation rows' support) and those supports."""
    centroids = torch.stack([train_emb[y_train == k].mean(0) for k in range(num_labels)])
    net.centroids.copy_(torch.nn.functional.normalize(centroids, dim=1, eps=1e-9))
    support = net.support(val_emb).numpy()
    return float(np.quantile(support, config.support_quantile)), support


@torch.no_grad()
def fit_memory(
    net,
    train_emb: torch.Tensor,
    y_train: torch.Tensor,
    val_emb: torch.Tensor,
    val_probs: np.ndarray,
    y_val: np.ndarray,
    config: RouterConfig,
) -> tuple[np.ndarray, dict]:
    """Remember the training embeddings and keep the mixing weight with the lowest validation log
    loss; returns the validation probabilities with the memory mixed in, and what was measured."""
    if config.neighbours == 0:
        return val_probs, {}
    num_labels = val_probs.shape[1]
    net.set_memory(
        train_emb, torch.nn.functional.one_hot(y_train, num_labels), config.neighbours, config.neighbour_temperature
    )
    neighbour = net.neighbour_probs(val_emb).numpy()
    mixes = {weight: (1 - weight) * val_probs + weight * neighbour for weight in config.neighbour_weights}
    losses = {weight: log_loss(mixed, y_val) for weight, mixed in mixes.items()}
    best = min(losses, key=losses.get)
    net.memory_weight.fill_(best)
    without = accuracy(val_probs, y_val)
    log(
        f"memory of {len(train_emb)} queries, k={net.k}: weight {best}; validation log loss "
        f"{log_loss(val_probs, y_val):.4f} -> {losses[best]:.4f}, accuracy {without:.4f} -> "
        f"{accuracy(mixes[best], y_val):.4f}"
    )
    return mixes[best], {"memory_weight": best, "val_accuracy_without_memory": without}


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean())


def fit_head(
    net: RouterNet, embeddings: torch.Tensor, tokens: PaddedTokens, labels: torch.Tensor, config: RouterConfig
) -> None:
    """Train the linear head and the lexical bag on cached embeddings (mini-batch Adam)."""
    generator = torch.Generator().manual_seed(config.seed)
    groups = [{"params": net.head.parameters(), "lr": config.head_lr}]
    if config.lexical_bag:
        groups.append({"params": net.bag.parameters(), "lr": config.bag_lr})
    optimiser = torch.optim.Adam(groups)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config.head_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 128):
            chosen = order[start : start + 128]
            ids, mask = tokens.rows(chosen)
            logits = net.head(embeddings[chosen]) + net.bag_logits(ids, mask)
            optimiser.zero_grad()
            loss_fn(logits, labels[chosen]).backward()
            optimiser.step()


class PaddedTokens:
    """All rows' token ids, padded once, sliced per batch to the batch's longest row."""

    def __init__(self, token_ids: list[list[int]]) -> None:
        input_ids, mask = pad(token_ids)
        self.input_ids, self.mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
        self.lengths = self.mask.sum(1)

    def rows(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index)
        width = int(self.lengths[index].max())
        return self.input_ids[index, :width], self.mask[index, :width]


class Cached:
    """Per row: the frozen part's output (embeddings + layers below ``split``) and token ids."""

    def __init__(self, states: list[torch.Tensor], tokens: PaddedTokens, split: int) -> None:
        self.states, self.tokens, self.split = states, tokens, split

    @classmethod
    def build(cls, net: RouterNet, token_ids: list[list[int]], split: int, progress: str | None = None) -> Cached:
        return cls(lower_states(net, token_ids, split, progress), PaddedTokens(token_ids), split)

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden, mask, input_ids) for rows ``index``, padded to the longest of them."""
        hidden, mask = pad_states([self.states[i] for i in index])
        ids, _ = self.tokens.rows(index)
        return hidden, mask, ids[:, : hidden.shape[1]]

    def logits_of(self, net: RouterNet, index: list[int]) -> torch.Tensor:
        hidden, mask, ids = self.batch(index)
        return net.logits_tail(hidden, mask, self.split, ids)

    @torch.no_grad()
    def _all(self, fn, batch_size: int = 64) -> torch.Tensor:
        order = sorted(range(len(self)), key=lambda i: len(self.states[i]))
        outputs: list[torch.Tensor | None] = [None] * len(self)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            for row, value in zip(index, fn(index)):
                outputs[row] = value
        return torch.stack(outputs)

    def embeddings(self, net: RouterNet) -> torch.Tensor:
        net.eval()
        return self._all(lambda index: net.embed_tail(*self.batch(index)[:2], self.split))

    def logits(self, net: RouterNet) -> torch.Tensor:
        net.eval()
        return self._all(lambda index: self.logits_of(net, index))


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length rows: shuffle, sort inside chunks of 50 batches,
    cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def lower_states(
    net: RouterNet, token_ids: list[list[int]], split: int, progress: str | None = None
) -> list[torch.Tensor]:
    """Per row, the (length, hidden) output of the frozen part: embeddings + layers ``:split``."""
    from tqdm.auto import tqdm

    net.eval()
    states: list[torch.Tensor | None] = [None] * len(token_ids)
    batches = list(length_sorted_batches(token_ids, 64))
    for index in tqdm(batches, desc=progress, disable=progress is None, leave=False, file=sys.stderr):
        input_ids, mask = (torch.from_numpy(a) for a in pad([token_ids[i] for i in index]))
        hidden = run_layers(net, net.encoder.embeddings(input_ids=input_ids), mask, 0, split)
        for row, i in enumerate(index):
            states[i] = hidden[row, : len(token_ids[i])].clone()
    return states


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in states)
    hidden = torch.zeros(len(states), width, states[0].shape[-1])
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for row, state in enumerate(states):
        hidden[row, : len(state)] = state
        mask[row, : len(state)] = 1
    return hidden, mask


def fine_tune(
    net: RouterNet,
    train: Cached,
    y_train: torch.Tensor,
    val: Cached,
    y_val: np.ndarray,
    config: RouterConfig,
    progress: bool,
) -> float:
    """Fine-tune the encoder layers above the cached split, the head and the bag; leaves ``net``
    at its best validation epoch and returns that accuracy."""
    from tqdm.auto import tqdm

    rng = random.Random(config.seed)
    lengths = [len(s) for s in train.states]
    steps_per_epoch = -(-len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(total * config.warmup_fraction))
    groups = [
        {"params": net.encoder.encoder.layer[train.split :].parameters(), "lr": config.lr},
        {"params": net.head.parameters(), "lr": config.head_lr / 10},
    ]
    if config.lexical_bag:
        groups.append({"params": net.bag.parameters(), "lr": config.bag_lr / 10, "weight_decay": 0.0})
    optimiser = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    loss_fn = nn.CrossEntropyLoss()
    best_acc, best_state = -1.0, None
    bar = tqdm(total=total, desc="fine-tuning", disable=not progress, file=sys.stderr)
    for epoch in range(config.epochs):
        net.train()
        for batch in bucketed_batches(lengths, config.batch_size, rng):
            loss = loss_fn(train.logits_of(net, batch), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        acc = accuracy(val.logits(net).numpy(), y_val)
        log(f"epoch {epoch + 1}: validation accuracy {acc:.4f}")
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(net.state_dict())
    bar.close()
    net.load_state_dict(best_state)
    return best_acc
