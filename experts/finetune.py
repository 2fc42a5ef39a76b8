"""Vertical fine-tuning: a question/answer JSONL file -> a registrable LoRA expert.

LoRA on the base model, chat-formatted, loss on the answer tokens only, seeded (same data,
config and seed -> same adapter). A held-out split measures the adapter against the base model
on the same rows. The output folder holds ``adapter_config.json``,
``adapter_model.safetensors`` and ``manifest.yaml`` and can be registered in one go.

Building blocks (:func:`load_pairs`, :func:`split_pairs`, :func:`train_lora`,
:func:`write_expert`, :func:`register_expert`) are public so the demo build can train several
experts first and evaluate them together.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experts.base_models import SMOLLM2_ID, ensure_base_model
from experts.chat import encode_pair
from experts.policy import DevicePolicy
from registry.errors import MoseError
from registry.home import MoseHome

ADAPTER_KEY = "default"
EXAMPLE_QUERY_CHARS = 600


class FinetuneConfig(BaseModel):
    """Hyper-parameters of one LoRA fine-tune (defaults sized for a 2-core CPU)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    steps: int | None = Field(default=30, ge=1)
    """Stop after this many optimizer steps (None: run every epoch to the end)."""

    epochs: int = Field(default=1, ge=1)
    """Passes over the training rows."""

    train_tokens: int | None = Field(default=None, ge=1)
    """Train on the leading shuffled rows whose tokens add up to this budget (None: every row)."""

    batch_size: int = Field(default=4, ge=1)
    """Question/answer pairs per step."""

    learning_rate: float = Field(default=1e-3, gt=0)
    """AdamW peak learning rate (short warm-up, then linear decay to a tenth; see ``lr_decay``)."""

    lr_decay: bool = True
    """Decay the learning rate linearly to a tenth of its peak after the warm-up (False: hold the
    peak to the end, for a shared seed whose experts each decay it on their own rows)."""

    rank: int = Field(default=8, ge=1, le=256)
    """LoRA rank."""

    alpha: int = Field(default=16, ge=1)
    """LoRA alpha (scaling = alpha / rank)."""

    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get LoRA adapters."""

    top_layers: int | None = Field(default=10, ge=1)
    """Adapt only the last N decoder layers (backward stops there: much faster on CPU); None adapts
    all layers."""

    max_tokens: int = Field(default=96, ge=16)
    """Question+answer tokens per row (longer rows are cut)."""

    heldout_rows: int = Field(default=16, ge=1)
    """Rows kept out of training to measure loss."""

    max_train_rows: int | None = Field(default=None, ge=1)
    """Use at most this many training rows."""

    seed: int = 0
    """Seed of the split, the batch order and the LoRA init."""

    curve_points: int = Field(default=2, ge=2)
    """Held-out loss measurements spread over training (the first is the base model's loss, the
    last the trained adapter's)."""

    example_queries: int = Field(default=24, ge=20)
    """Example queries written into the manifest."""


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    source: str = ""
    """Where the row came from (the data file's optional ``source`` field)."""


@dataclass
class TrainedAdapter:
    """A trained LoRA adapter, in memory."""

    lora_config: Any
    state_dict: dict
    train_losses: list[float]
    seconds: float
    curve: list[Any] = field(default_factory=list)
    train_tokens: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())

    @property
    def heldout_loss(self) -> float | None:
        """Held-out answer loss after training (the curve's last point), if measured."""
        return self.curve[-1].heldout_loss if self.curve else None

    @property
    def base_heldout_loss(self) -> float | None:
        """The base model's held-out answer loss on the same rows (the curve's first point)."""
        return self.curve[0].heldout_loss if self.curve else None


class FinetuneResult(BaseModel):
    """What a fine-tune produced."""

    name: str = Field(description="Expert name.")
    out_dir: Path = Field(description="Folder with the adapter and manifest.yaml.")
    manifest_path: Path = Field(description="The manifest.")
    heldout_loss: float = Field(description="Held-out answer loss of the adapter.")
    base_heldout_loss: float = Field(description="Held-out answer loss of the base model on the same rows.")
    heldout_rows: int = Field(description="Rows in the held-out split.")
    train_rows: int = Field(description="Rows available for training.")
    steps: int = Field(description="Optimizer steps run.")
    train_seconds: float = Field(description="Training wall time.")
    registered: str | None = Field(default=None, description="name@version when registered.")

    def text(self) -> str:
        lines = [
            f"expert {self.name}: {self.steps} steps in {self.train_seconds:.0f}s on {self.train_rows} rows",
            f"held-out answer loss on {self.heldout_rows} rows: adapter {self.heldout_loss:.3f}, "
            f"base model {self.base_heldout_loss:.3f}",
            f"written to {self.out_dir}",
        ]
        if self.registered:
            lines.append(f"registered and activated {self.registered}")
        return "\n".join(lines)


# ---------------------------------------------------------------- data


def load_pairs(path: str | Path) -> list[QAPair]:
    """Read ``{"question": ..., "answer": ..., "source": ...}`` lines (``source`` optional); errors
    name the line."""
    path = Path(path)
    if not path.is_file():
        raise MoseError(f"{path}: data file not found (expected JSONL with question and answer fields)")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoseError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from None
            question, answer = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
            if (
                not isinstance(question, str)
                or not isinstance(answer, str)
                or not question.strip()
                or not answer.strip()
            ):
                raise MoseError(f"{path.name} line {number}: needs non-empty string fields 'question' and 'answer'")
            source = row.get("source")
            pairs.append(QAPair(question.strip(), answer.strip(), source if isinstance(source, str) else ""))
    return pairs


def split_pairs(pairs: list[QAPair], heldout_rows: int, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """Seeded (train, held-out) split; the held-out split is the same for every fine-tune config."""
    if len(pairs) < heldout_rows + 2:
        raise MoseError(f"need at least {heldout_rows + 2} question/answer rows, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    heldout = [pairs[i] for i in order[:heldout_rows]]
    train = [pairs[i] for i in order[heldout_rows:]]
    return train, heldout


# ---------------------------------------------------------------- training


def load_base_for_training(home: MoseHome | None = None) -> tuple[Any, Any]:
    """A fresh fp32 copy of the base model and its tokenizer (training changes the model in place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = ensure_base_model(SMOLLM2_ID, home)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    return model, tokenizer


def lora_config_for(config: FinetuneConfig, num_layers: int) -> Any:
    from peft import LoraConfig

    layers = None
    if config.top_layers is not None and config.top_layers < num_layers:
        layers = list(range(num_layers - config.top_layers, num_layers))
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def train_lora(
    model: Any,
    tokenizer: Any,
    train: list[QAPair],
    config: FinetuneConfig,
    progress: bool = True,
    label: str = "finetune",
    heldout: list[QAPair] | None = None,
    trunk: Any = None,
    init_state: dict | None = None,
) -> tuple[Any, TrainedAdapter]:
    """Train a LoRA adapter on ``model`` (wrapped in place); return (peft model, adapter).

    The frozen layers below the adapted ones run once per row (:mod:`experts.lora_training`);
    pass the ``trunk`` of an earlier call on the same base model to reuse its cached rows.
    ``heldout`` rows give the adapter's held-out loss curve (``config.curve_points`` points).
    ``init_state`` (an adapter state dict of the same shape, e.g. a shared seed) is where training
    starts instead of the identity; the curve's first point is then that adapter's loss.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from experts.lora_training import take_tokens, train_cached

    policy = DevicePolicy()
    policy.plan()  # CPU thread setting
    torch.manual_seed(config.seed)
    num_layers = model.config.num_hidden_layers
    peft_model = get_peft_model(model, lora_config_for(config, num_layers), adapter_name=ADAPTER_KEY)
    if init_state is not None:
        loaded = set_peft_model_state_dict(peft_model, init_state, adapter_name=ADAPTER_KEY)
        if loaded.unexpected_keys:
            raise MoseError(f"initial adapter does not fit these settings: {sorted(loaded.unexpected_keys)[:3]}")
    rows = train[: config.max_train_rows] if config.max_train_rows else train
    encoded = take_tokens(
        [encode_pair(tokenizer, p.question, p.answer, config.max_tokens) for p in rows], config.train_tokens
    )
    held = [encode_pair(tokenizer, p.question, p.answer, config.max_tokens) for p in heldout or []]
    trunk = trunk or new_trunk(peft_model.base_model.model, tokenizer, config)
    run = train_cached(
        peft_model,
        trunk,
        encoded,
        held,
        batch_size=config.batch_size,
        epochs=config.epochs,
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        decay=config.lr_decay,
        seed=config.seed + 1,
        curve_points=config.curve_points,
        progress=progress,
        label=label,
    )
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_KEY).items()}
    lora_config = peft_model.peft_config[ADAPTER_KEY]
    lora_config.base_model_name_or_path = SMOLLM2_ID  # an id, never a path or hub name to fetch
    lora_config.inference_mode = True
    return peft_model, TrainedAdapter(lora_config, state, run.train_losses, run.seconds, run.curve, run.train_tokens)


def plain_heldout_loss(tokenizer: Any, rows: list[QAPair], config: FinetuneConfig, trunk: Any) -> float:
    """Mean answer NLL per token of ``rows`` under the trunk's model as it is (the base model when
    no adapter is attached), rows cut as training cuts them."""
    encoded = [encode_pair(tokenizer, p.question, p.answer, config.max_tokens) for p in rows]
    trunk.fill(encoded)
    return round(trunk.mean_nll(encoded), 4)


def new_trunk(model: Any, tokenizer: Any, config: FinetuneConfig) -> Any:
    """A :class:`~experts.lora_training.TrunkCache` of the layers ``config`` leaves unadapted, for
    :func:`train_lora` calls on the same base model to share."""
    from experts.lora_training import TrunkCache

    policy = DevicePolicy()
    num_layers = model.config.num_hidden_layers
    split = num_layers - config.top_layers if config.top_layers and config.top_layers < num_layers else 0
    device = policy.resolve_device()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrunkCache(model, split, pad, dtype=policy.compute_dtype(device) if device == "cpu" else None)


# ---------------------------------------------------------------- output and registration


def example_queries(pairs: list[QAPair], count: int, seed: int) -> list[str]:
    """``count`` distinct questions from the data (shortened), seeded."""
    questions = list(dict.fromkeys(p.question for p in pairs))
    random.Random(seed + 2).shuffle(questions)
    chosen = [
        q if len(q) <= EXAMPLE_QUERY_CHARS else q[:EXAMPLE_QUERY_CHARS].rsplit(" ", 1)[0] + " ..."
        for q in questions[:count]
    ]
    if len(chosen) < 20:
        raise MoseError(f"the data has only {len(chosen)} distinct questions; a manifest needs 20 example queries")
    return chosen


def write_expert(
    out_dir: str | Path,
    name: str,
    domain: str,
    adapter: TrainedAdapter,
    pairs: list[QAPair],
    metrics: dict[str, float],
    config: FinetuneConfig,
    version: str = "0.1.0",
    owner: str = "local",
    license: str = "Apache-2.0",
    description: str | None = None,
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and manifest.yaml; return the manifest path."""
    from safetensors.torch import save_file

    from experts.base_models import sha256_file
    from registry.manifest import ExpertManifest, dump_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_data = adapter.lora_config.to_dict()
    config_data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config_data.items()}
    (out / "adapter_config.json").write_text(json.dumps(config_data, indent=2, sort_keys=True, default=str))
    save_file(
        {k: v.contiguous() for k, v in adapter.state_dict.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    files = {rel: sha256_file(out / rel) for rel in ("adapter_config.json", "adapter_model.safetensors")}
    manifest = ExpertManifest(
        name=name,
        version=version,
        kind="lora",
        base_model=SMOLLM2_ID,
        files=files,
        domains=[domain],
        description=description
        or f"LoRA expert for {domain} questions, fine-tuned on {len(pairs)} question/answer pairs.",
        owner=owner,
        license=license,
        example_queries=example_queries(pairs, config.example_queries, config.seed),
        quantization="none",
        resources={"memory_mb": max(1, math.ceil(adapter.nbytes / (1 << 20)))},
        metrics={k: round(float(v), 4) for k, v in metrics.items()},
    )
    path = out / "manifest.yaml"
    dump_manifest(manifest, path)
    return path


def register_expert(
    manifest_path: Path,
    home: MoseHome | None = None,
    actor: str = "finetune",
    activate: Callable[[Any, str, str, str], Any] | None = None,
) -> str:
    """Register the folder of ``manifest_path`` and activate it; return ``name@version``.
    ``activate(registry, name, version, actor)`` activates it (default: ``Registry.activate``; the
    CLI passes ``serve.activation.activate``, which also teaches the router the expert's domain)."""
    from registry import Registry

    registry = Registry.open(home or MoseHome.from_env())
    try:
        record = registry.add(manifest_path, files_dir=manifest_path.parent, actor=actor)
        if activate is None:
            registry.activate(record.name, record.version, actor=actor)
        else:
            activate(registry, record.name, record.version, actor)
        return f"{record.name}@{record.version}"
    finally:
        registry.close()


def finetune(
    data: str | Path,
    domain: str,
    name: str,
    config: FinetuneConfig | None = None,
    out_dir: str | Path | None = None,
    home: MoseHome | None = None,
    register: bool = False,
    version: str = "0.1.0",
    owner: str = "local",
    license: str = "Apache-2.0",
    progress: bool = True,
    activate: Callable[[Any, str, str, str], Any] | None = None,
) -> FinetuneResult:
    """Fine-tune a LoRA expert on ``data`` and write it (and optionally register + activate it,
    with ``activate`` as :func:`register_expert` takes it)."""
    import torch

    config = config or FinetuneConfig()
    home = home or MoseHome.from_env()
    if register:
        _check_domain(home, domain)
    pairs = load_pairs(data)
    train, heldout = split_pairs(pairs, config.heldout_rows, config.seed)
    model, tokenizer = load_base_for_training(home)
    peft_model, adapter = train_lora(model, tokenizer, train, config, progress, label=name, heldout=heldout)
    loss, base_loss = adapter.heldout_loss, adapter.base_heldout_loss
    out = Path(out_dir) if out_dir else home.root / "finetuned" / f"{name}-{version}"
    metrics = {
        "heldout_loss": loss,
        "base_heldout_loss": base_loss,
        "heldout_rows": len(heldout),
        "train_steps": len(adapter.train_losses),
        "final_train_loss": adapter.train_losses[-1],
    }
    manifest_path = write_expert(out, name, domain, adapter, pairs, metrics, config, version, owner, license)
    del peft_model, model
    torch.set_grad_enabled(True)
    registered = register_expert(manifest_path, home, activate=activate) if register else None
    return FinetuneResult(
        name=name,
        out_dir=out,
        manifest_path=manifest_path,
        heldout_loss=loss,
        base_heldout_loss=base_loss,
        heldout_rows=len(heldout),
        train_rows=len(train),
        steps=config.steps,
        train_seconds=adapter.seconds,
        registered=registered,
    )


def _check_domain(home: MoseHome, domain: str) -> None:
    """Fail before training, not after, when the registry would refuse the domain."""
    from registry import Registry

    registry = Registry.open(home)
    try:
        registry.taxonomy.require_known([domain], "--domain")
    finally:
        registry.close()
