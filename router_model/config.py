"""Configuration of the learned router: one pydantic model, every field documented."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RouterConfig(BaseModel):
    """How the router is trained, calibrated, exported and run.

    The defaults are chosen for 2 CPU cores against the router's targets (held-out accuracy
    >= 0.90 with every source >= 0.75, p50 <= 5 ms, >= 500 queries/s batched): figures in
    docs/benchmarks.md (``benchmarks/router.py``), choices in docs/decisions/router-neighbour-memory.md.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # --- encoder -------------------------------------------------------------------------
    max_length: int = Field(default=64, ge=8, le=512)
    """Tokens kept per query (longer queries are truncated). The first 64 tokens carry the
    domain; more tokens cost latency linearly."""

    encoder_layers: int = Field(default=3, ge=1, le=6)
    """How many of MiniLM's 6 transformer layers the router keeps. Fewer layers halve the CPU
    cost; fine-tuning recovers the accuracy (measured, see the README)."""

    fine_tune: Literal["auto", "yes", "no"] = "auto"
    """Fine-tune the encoder ("yes"), train the head only on frozen embeddings ("no"), or train
    both and keep the one with the better validation accuracy ("auto"; the choice is recorded)."""

    tune_layers: int = Field(default=3, ge=1, le=6)
    """When fine-tuning, how many of the top encoder layers are trained. The embeddings and the
    layers below stay frozen, so their outputs are computed once and cached: each training step
    then costs only the top layers (3x cheaper with 1 of 3 layers). Measured on validation:
    tuning the top layer only gave 0.871 (head only 0.860)."""

    # --- optimisation --------------------------------------------------------------------
    epochs: int = Field(default=2, ge=1)
    """Passes over the training rows when fine-tuning the encoder (the learning rate decays to 0
    over them). Training on ``routing_dev.jsonl`` plus the demo experts' queries with 3 epochs kept
    the second epoch's weights (best validation accuracy), so 2 is the default: a third of the
    router's share of the first ``mose up``."""

    batch_size: int = Field(default=32, ge=1)
    """Training batch size (queries per step)."""

    lr: float = Field(default=1.5e-4, gt=0)
    """Learning rate of the encoder when fine-tuning (AdamW, linear warm-up and decay)."""

    head_lr: float = Field(default=2e-3, gt=0)
    """Learning rate of the linear head (both modes)."""

    head_epochs: int = Field(default=20, ge=1)
    """Passes over the cached embeddings when training the head (and bag) on frozen features."""

    lexical_bag: bool = True
    """Add a learned per-label weight for every word piece to the logits (a TF-IDF-like lexical
    model inside the same graph; measured +5 points held-out accuracy over the head alone)."""

    bag_lr: float = Field(default=1e-2, gt=0)
    """Learning rate of the lexical bag (head-only phase; a tenth when fine-tuning)."""

    neighbours: int = Field(default=10, ge=0)
    """Nearest training queries (cosine similarity of the router's own embeddings) whose labels
    are mixed into the classifier's probabilities; 0 turns the memory off. Measured on held-out
    rows (same training run): accuracy 0.892 -> 0.905, mostly on MMLU, whose subjects the ten
    domain labels lump together."""

    neighbour_temperature: float = Field(default=0.02, gt=0)
    """tau of ``softmax(similarity / tau)`` over the neighbours: small, so the closest few decide."""

    neighbour_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    """Mixing weights tried for the memory; the one with the lowest validation log loss is kept
    (0 keeps the classifier alone)."""

    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""

    warmup_fraction: float = Field(default=0.06, ge=0, lt=1)
    """Fraction of the fine-tuning steps spent warming the learning rate up."""

    seed: int = 0
    """Seed for every random choice (torch, numpy, shuffling); the splits use hashes instead."""

    threads: int = Field(default=0, ge=0)
    """Torch training threads; 0 = automatic: all cores when other processes leave them free, one
    when they keep more than half a core busy (this process's own work does not count; two
    threads on a busy 2-core machine measured 3.7x slower per step than one). ONNX Runtime uses
    its default (all cores) unless this is set."""

    # --- data ----------------------------------------------------------------------------
    heldout_fraction: float = Field(default=0.2, ge=0, lt=1)
    """Share of each labelled file held out for evaluation (chosen by a hash of the row id);
    training never sees these rows."""

    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of the training rows kept aside (by hash) for model choice, temperature and
    threshold."""

    split_salt: str = "mose-router-v1"
    """Salt of the hash splits; changing it changes which rows are held out."""

    max_rows_per_label: int | None = Field(default=None, ge=1)
    """Cap on training rows per label (deterministic subset); None keeps all."""

    # --- calibration and abstention ------------------------------------------------------
    target_precision: float = Field(default=0.85, gt=0, le=1)
    """The abstain threshold is the smallest calibrated confidence at which the answered
    validation queries reach this precision. An abstained query is answered by the fallback
    (base model) and counts as a miss in the router's accuracy, so the default asks for about
    the precision the router has anyway: it abstains on the low-confidence tail only."""

    min_threshold: float = Field(default=0.3, ge=0, lt=1)
    """Floor of the abstain threshold, so queries no label explains (nonsense) go to the
    fallback even when the validation precision is already above the target."""

    support_quantile: float = Field(default=0.005, ge=0, lt=1)
    """Out-of-distribution guard: the router also abstains when the query's best cosine
    similarity to a label centroid is below this quantile of the validation rows' (so about
    this share of in-distribution queries is given up to catch text unlike any training data)."""

    top_k: int = Field(default=3, ge=1)
    """Alternatives listed in each routing decision."""

    # --- export --------------------------------------------------------------------------
    quantize: bool = True
    """Try int8 dynamic quantisation of the ONNX graph; kept only within ``quantize_tolerance``."""

    quantize_tolerance: float = Field(default=0.005, ge=0)
    """Largest validation-accuracy loss (absolute) allowed for the int8 graph."""

    # --- incremental update --------------------------------------------------------------
    update_rows_per_label: int = Field(default=150, ge=1)
    """Rows per existing label re-embedded when a new domain's head row is fitted."""

    update_steps: int = Field(default=300, ge=1)
    """Optimiser steps for a new domain's head row."""

    # --- runtime -------------------------------------------------------------------------
    fallback_expert: str = "base"
    """Name returned as ``expert`` when the router abstains or no active expert covers the
    domain's taxonomy chain (the server answers with the base model)."""

    runtime_batch_size: int = Field(default=64, ge=1)
    """Queries per ONNX Runtime call in ``route_batch`` (sorted by length to limit padding)."""

    expert_refresh_s: float = Field(default=2.0, ge=0)
    """How long the domain -> expert mapping read from the registry is reused."""

    use_cuda: bool = True
    """Run the router on ONNX Runtime's CUDA provider when it is listed and a GPU is present (it
    falls back to CPU if the provider cannot load). On the GPU the artifact's fp32 graph is used:
    int8 dynamic quantisation runs slower there than fp32."""
