"""Teach the current router the domains of newly activated experts, without retraining the encoder.

For every active expert whose primary domain is not yet a router label, a head row is added
and fitted on frozen embeddings: the new expert's example queries against a sample of the
existing labels' training rows (class-balanced loss); the example queries join the router's
memory of labelled embeddings. The old rows and the encoder are kept
exactly, so existing routing only changes where the new domain now wins. The result is
exported and published as a new version; a later ``mose router train`` folds the new domains
into a full training (their example queries come from the registry).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from pydantic import BaseModel, Field

from router_model.artifact import HELDOUT_ROWS, TRAIN_ROWS, VALIDATION_ROWS, current_dir, read_metadata
from router_model.config import RouterConfig
from router_model.data import LabelledQuery, TrainingData, cap_per_label, load_jsonl, registry_rows
from router_model.export import write_artifact
from router_model.model import load as load_net
from router_model.model import run_batched
from router_model.tokens import encode, load_tokenizer
from router_model.train import TrainedRouter, log, seeded_training

UPDATE_CHECK_ROWS = 256
"""Validation rows the exported graph is checked on during an update (the full set costs ~20 s)."""


class UpdateResult(BaseModel):
    """What ``mose router update`` did."""

    version: str
    """The live version afterwards."""
    previous: str
    """The version the update started from."""
    added_domains: list[str] = Field(default_factory=list)
    """Domains that got a new head row (empty: the router was up to date)."""
    example_queries: int = 0
    """Example queries the new rows were fitted on."""
    seconds: float = 0.0
    """Wall time of the update."""


def new_domain_rows(registry, labels: list[str]) -> dict[str, list[LabelledQuery]]:
    """Example queries of active experts whose primary domain the router does not know."""
    rows, _ = registry_rows(registry)
    grouped: dict[str, list[LabelledQuery]] = defaultdict(list)
    for row in rows:
        if row.domain not in labels:
            grouped[row.domain].append(row)
    return dict(sorted(grouped.items()))


def fit_new_rows(
    old_logits: torch.Tensor,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    init: torch.Tensor,
    bias_init: torch.Tensor,
    config: RouterConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head rows (weight, bias) for the new labels; the old labels' logits stay fixed.
    Class-balanced cross-entropy, so 20 example queries count as much as a big old label."""
    weight = init.clone().requires_grad_(True)
    bias = torch.full((init.shape[0],), float(bias_init)).requires_grad_(True)
    counts = torch.bincount(targets, minlength=old_logits.shape[1] + init.shape[0]).float().clamp(min=1)
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(counts) * counts))
    optimiser = torch.optim.Adam([weight, bias], lr=config.head_lr * 5)
    for _ in range(config.update_steps):
        logits = torch.cat([old_logits, embeddings @ weight.T + bias], dim=1)
        optimiser.zero_grad()
        loss_fn(logits, targets).backward()
        optimiser.step()
    return weight.detach(), bias.detach()


@torch.no_grad()
def grow(
    net,
    weight: torch.Tensor,
    bias: torch.Tensor,
    centroids: torch.Tensor,
    memory_rows: torch.Tensor,
    memory_targets: torch.Tensor,
) -> None:
    """Append output rows to the head, zero columns to the lexical bag, rows to the centroids,
    and the new example queries (embeddings, label indexes) to the memory."""
    old = net.head
    net.head = torch.nn.Linear(old.in_features, old.out_features + len(weight))
    net.head.weight.copy_(torch.cat([old.weight, weight]))
    net.head.bias.copy_(torch.cat([old.bias, bias]))
    bag = torch.nn.Embedding(net.bag.num_embeddings, net.bag.embedding_dim + len(weight))
    bag.weight.copy_(torch.cat([net.bag.weight, torch.zeros(net.bag.num_embeddings, len(weight))], dim=1))
    net.bag = bag
    net.centroids = torch.cat([net.centroids, centroids])
    if net.k:
        labels = torch.nn.functional.one_hot(memory_targets, net.head.out_features).to(net.memory_labels.dtype)
        old_labels = torch.nn.functional.pad(net.memory_labels, (0, len(weight)))
        net.set_memory(
            torch.cat([net.memory, memory_rows]),
            torch.cat([old_labels, labels]),
            net.k,
            float(net.memory_temperature),
            float(net.memory_weight),
        )


def update_router(home, registry, progress: bool = True) -> UpdateResult:
    """Add head rows for new domains and publish a new version (no-op when nothing is new)."""
    started = time.perf_counter()
    directory = current_dir(home.router_dir)
    metadata = read_metadata(directory)
    config = RouterConfig.model_validate(metadata.config)
    new = new_domain_rows(registry, metadata.labels)
    if not new:
        return UpdateResult(version=metadata.version, previous=metadata.version, seconds=time.perf_counter() - started)
    with seeded_training(config.seed, config.threads):
        return _update(home, registry, directory, metadata, config, new, started, progress)


def _update(
    home, registry, directory, metadata, config: RouterConfig, new: dict, started: float, progress: bool
) -> UpdateResult:
    log(f"new domains: {', '.join(f'{d} ({len(r)} queries)' for d, r in new.items())}")

    net = load_net(directory)
    train_rows = load_jsonl(directory / TRAIN_ROWS)
    old_sample = cap_per_label(train_rows, config.update_rows_per_label, config.split_salt)
    new_rows = [row for rows in new.values() for row in rows]
    labels = metadata.labels + list(new)
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = load_tokenizer(directory, config.max_length)
    fit_rows = old_sample + new_rows
    token_ids = encode(tokenizer, [r.query for r in fit_rows])
    with torch.no_grad():
        embeddings = torch.from_numpy(run_batched(net.embed, token_ids, progress="embedding" if progress else None))
        old_logits = torch.from_numpy(run_batched(net.logits, token_ids))
    targets = torch.tensor([index[r.domain] for r in fit_rows])
    centroids = torch.stack([embeddings[targets == index[d]].mean(0) for d in new])
    centroids = torch.nn.functional.normalize(centroids, dim=1)
    weight, bias = fit_new_rows(old_logits, embeddings, targets, centroids, net.head.bias.mean(), config)
    fresh = slice(len(old_sample), None)
    grow(net, weight, bias, centroids, embeddings[fresh], targets[fresh])
    net.eval()

    experts = sorted({*metadata.experts, *registry_rows(registry)[1]})
    data = TrainingData(
        train=train_rows + new_rows,
        validation=load_jsonl(directory / VALIDATION_ROWS),
        heldout=load_jsonl(directory / HELDOUT_ROWS),
        files=metadata.data.get("files", {}),
        experts=experts,
    )
    trained = TrainedRouter(
        net=net,
        labels=labels,
        threshold=metadata.threshold,
        min_support=metadata.min_support,
        fine_tuned=metadata.fine_tuned,
        metrics={**metadata.metrics, "update_fit_rows": len(fit_rows)},
    )
    # The validation rows predate the new domains; keep the parent's int8 choice rather than
    # re-deciding it on rows that cannot show the new rows' effect.
    export_config = config.model_copy(update={"quantize": metadata.quantized})
    target = write_artifact(
        home.router_dir, trained, data, export_config,
        parent=metadata.version, added_domains=[*metadata.added_domains, *new],
        require_speedup=False, check_rows=UPDATE_CHECK_ROWS,
    )  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    log(f"published {target.name} (from {metadata.version}) in {seconds} s")
    return UpdateResult(
        version=target.name,
        previous=metadata.version,
        added_domains=list(new),
        example_queries=len(new_rows),
        seconds=seconds,
    )
