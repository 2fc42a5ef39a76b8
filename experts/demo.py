"""Demo experts: one LoRA expert per vertical of ``../shared/data/sft/``, registered and active.

``build_demo`` shapes each vertical's rows into chat answers (:mod:`experts.sft_data`), keeps a
held-out split fixed by a hash of the question, and trains on a token budget per vertical set by
the profile, in two phases (branch-train, as in Branch-Train-Merge): the first ``seed_share`` of
every vertical's budget, all verticals together, trains one shared seed adapter at its peak
learning rate; each expert then starts from the seed and trains on the rest of its own
vertical's budget while the rate decays (warm-up, stable, decay). The frozen lower
layers run once per row (:mod:`experts.lora_training`). Each expert's held-out loss curve is
measured against the base model and the seed on the same rows; the experts are then registered
and activated. Results go to
``MOSE_HOME/demo/report.json``; ``mose demo docs`` renders them as ``docs/experts.md``. A
second run is a no-op.

Profiles: ``start`` is what ``mose up`` builds on a fresh machine (about 45 s per expert on a
2-core CPU); ``full`` trains four times the tokens for two epochs, for offline comparisons.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from experts.finetune import (
    FinetuneConfig,
    QAPair,
    load_base_for_training,
    load_pairs,
    new_trunk,
    plain_heldout_loss,
    register_expert,
    train_lora,
    write_expert,
)
from experts.sft_data import HELDOUT_FRACTION, shape_pair, split_by_hash
from registry.errors import MoseError
from registry.home import MoseHome

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "MOSE_SHARED_DATA"
VERTICALS = (
    "medicine",
    "law",
    "finance",
    "math",
    "code",
    "science",
    "humanities",
    "social_science",
    "general_knowledge",
)
DEMO_OWNER = "mose-demo"
DEMO_VERSION = "0.6.0"

Profile = Literal["start", "full"]


def default_data_dir() -> Path:
    """``$MOSE_SHARED_DATA``, else ``<repo>/../shared/data``."""
    return Path(os.environ.get(DATA_ENV) or REPO_ROOT.parent / "shared" / "data")


def demo_name(vertical: str) -> str:
    return "demo-" + vertical.replace("_", "-")


def profile_finetune(profile: Profile) -> FinetuneConfig:
    """Fine-tune settings of a profile. ``start``: 12k training tokens per vertical, one epoch
    (what fits the first ``mose up``'s budget; docs/experts.md shows the curves). ``full``: 64k
    tokens, two epochs. A vertical's budget is split between the shared seed and its own expert
    (:attr:`DemoConfig.seed_share`)."""
    budget, epochs, points = {"start": (12_000, 1, 3), "full": (64_000, 2, 8)}[profile]
    return FinetuneConfig(
        steps=None,
        epochs=epochs,
        train_tokens=budget,
        batch_size=8,
        learning_rate=2e-3,
        rank=8,
        alpha=16,
        top_layers=10,
        max_tokens=128,
        curve_points=points,
    )


class DemoConfig(BaseModel):
    """What the demo build trains and on which rows."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir, description="Folder holding sft/<vertical>.jsonl.")
    verticals: list[str] = Field(default=list(VERTICALS), description="Verticals that get an expert.")
    profile: Profile = Field(
        default="start",
        description="Training budget: 'start' (what `mose up` builds) or 'full' (4x the tokens, 2 epochs).",
    )
    finetune: FinetuneConfig | None = Field(
        default=None, description="Fine-tune settings per expert (None: the profile's)."
    )
    heldout_fraction: float = Field(
        default=HELDOUT_FRACTION, gt=0, lt=1, description="Share of questions (by hash) never trained on."
    )
    eval_rows: int = Field(
        default=50,
        ge=1,
        description="Held-out rows (the first by hash) each expert and the base model are measured on "
        "(most of a vertical's build time on 2 cores is these evaluations, not its training).",
    )
    version: str = Field(default=DEMO_VERSION, description="Version of the demo experts.")
    seed_share: float = Field(
        default=0.75,
        ge=0,
        lt=1,
        description="Share of each vertical's token budget trained first, all verticals together, "
        "into one seed adapter that every expert continues from on the rest of its own budget "
        "(0: each expert starts from the base model). The nine verticals share most of what a "
        "small model learns from them (the chat answer's shape), so a seed learns it once.",
    )
    seed_holds_lr: bool = Field(
        default=True,
        description="The seed holds its peak learning rate after the warm-up and each expert decays "
        "it on its own rows (warm-up, stable, decay: an expert's own rows are its annealing); "
        "False: the seed decays too and each expert warms up again from its end.",
    )
    branch_lr_factor: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Peak learning rate of an expert's own training after the seed, as a share of "
        "the profile's (a seeded expert refines rather than learns from scratch).",
    )

    @model_validator(mode="after")
    def _profile_settings(self) -> DemoConfig:
        if self.finetune is None:
            self.finetune = profile_finetune(self.profile)
        return self

    @property
    def settings(self) -> FinetuneConfig:
        assert self.finetune is not None
        return self.finetune


class ExpertResult(BaseModel):
    """How one demo expert was trained and how it does on its vertical's held-out rows."""

    heldout_loss: float = Field(description="Held-out answer loss (mean NLL per answer token) after training.")
    base_heldout_loss: float = Field(description="The base model's held-out loss on the same rows.")
    seed_heldout_loss: float | None = Field(
        default=None, description="The shared seed adapter's held-out loss on the same rows (None: no seed)."
    )
    heldout_rows: int = Field(description="Held-out rows measured.")
    train_rows: int = Field(description="Training rows available after shaping.")
    dropped_rows: int = Field(
        description="Source rows dropped by shaping (echoes, empty answers, options "
        "that need their question's choices)."
    )
    train_tokens: int = Field(description="Tokens of this vertical trained on after the seed (all epochs).")
    steps: int = Field(description="Optimizer steps after the seed.")
    seconds: float = Field(description="Training wall time after the seed, trunk cache included.")
    curve: list[tuple[int, int, float]] = Field(
        description="(step, tokens seen, held-out loss): the base model at 0, then the expert's "
        "training, its steps and tokens counted after the seed's."
    )


class SeedResult(BaseModel):
    """The shared seed adapter the experts branch from."""

    key: str = Field(description="Hash of the settings and rows it was trained on (its cache key).")
    rows: int = Field(description="Training rows (the first seed_share of every vertical's budget).")
    train_tokens: int = Field(description="Training tokens seen.")
    steps: int = Field(description="Optimizer steps.")
    seconds: float = Field(description="Training wall time (0 when loaded from the cache).")


class DemoReport(BaseModel):
    """Result of a demo build."""

    profile: Profile = Field(default="start", description="Profile the experts were trained with.")
    version: str = Field(default=DEMO_VERSION, description="Version of the demo experts.")
    settings: FinetuneConfig | None = Field(default=None, description="Fine-tune settings of the last build.")
    built: list[str] = Field(default_factory=list, description="Experts trained and registered by this run.")
    already_built: bool = Field(default=False, description="True when nothing had to be done.")
    experts: dict[str, ExpertResult] = Field(default_factory=dict, description="Vertical -> result.")
    seed: SeedResult | None = Field(default=None, description="The shared seed adapter (None: seed_share 0).")
    seed_share: float = Field(default=0.0, description="Share of each vertical's budget trained into the seed.")
    seed_holds_lr: bool = Field(
        default=False, description="Whether the seed held its peak learning rate (the experts decayed it)."
    )
    branch_learning_rate: float | None = Field(
        default=None, description="Peak learning rate of the experts' training after the seed."
    )
    seconds: dict[str, float] = Field(default_factory=dict, description="Wall time per phase.")

    @property
    def wins(self) -> dict[str, bool]:
        """Vertical -> its expert's held-out loss is below the base model's."""
        return {v: r.heldout_loss < r.base_heldout_loss for v, r in self.experts.items()}

    def text(self) -> str:
        head = (
            "demo experts already built (nothing to do)"
            if self.already_built
            else f"built {len(self.built)} demo expert(s) in {self.seconds.get('total', 0):.0f}s ({self.profile} profile)"
        )
        return head + "\n\n" + results_table(self)


def results_table(report: DemoReport) -> str:
    """Markdown table: per vertical, held-out loss of the base model and of its expert."""
    lines = [
        "| vertical | held-out rows | base loss | seed loss | expert loss | change vs base | own tokens | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vertical, r in report.experts.items():
        seed = "-" if r.seed_heldout_loss is None else f"{r.seed_heldout_loss:.3f}"
        lines.append(
            f"| {vertical} | {r.heldout_rows} | {r.base_heldout_loss:.3f} | {seed} | {r.heldout_loss:.3f} | "
            f"{r.heldout_loss - r.base_heldout_loss:+.3f} | {r.train_tokens:,} | {r.steps} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class VerticalData:
    """One vertical's shaped rows, split by hash."""

    train: list[QAPair]
    """Training rows, in the seeded order training reads them."""
    heldout: list[QAPair]
    """Held-out rows, in hash order."""
    dropped: int
    """Source rows dropped by shaping."""


def load_vertical(data_dir: Path, vertical: str, fraction: float = HELDOUT_FRACTION, seed: int = 0) -> VerticalData:
    """Shape ``sft/<vertical>.jsonl`` into chat pairs and split it by question hash."""
    path = data_dir / "sft" / f"{vertical}.jsonl"
    if not path.is_file():
        raise MoseError(f"demo data {path} not found: pass --data DIR (the folder holding sft/) or set {DATA_ENV}")
    shaped, dropped = [], 0
    for row in load_pairs(path):
        pair = shape_pair(row.question, row.answer, row.source)
        if pair is None:
            dropped += 1
        else:
            shaped.append(QAPair(pair.question, pair.answer, pair.source))
    train, heldout = split_by_hash(shaped, fraction)
    random.Random(seed).shuffle(train)
    return VerticalData(train=train, heldout=heldout, dropped=dropped)


# ---------------------------------------------------------------- build


def report_path(home: MoseHome) -> Path:
    return home.root / "demo" / "report.json"


def load_report(home: MoseHome) -> DemoReport | None:
    """The last build's report, or None."""
    try:
        return DemoReport.model_validate_json(report_path(home).read_text())
    except (OSError, ValueError):
        return None


def _active_demo_versions(registry: Any, config: DemoConfig) -> dict[str, Any]:
    active = {}
    for vertical in config.verticals:
        record = registry.active(demo_name(vertical))
        if record is not None and record.version == config.version:
            active[vertical] = record
    return active


def build_demo(home: MoseHome | None = None, config: DemoConfig | None = None, progress: bool = True) -> DemoReport:
    """Train, register and activate the missing demo experts; record their results."""
    from registry import Registry

    home = home or MoseHome.from_env()
    config = config or DemoConfig()
    data = {
        v: load_vertical(config.data_dir, v, config.heldout_fraction, config.settings.seed) for v in config.verticals
    }
    with Registry.open(home) as registry:
        active = _active_demo_versions(registry, config)
    saved = load_report(home)
    if len(active) == len(config.verticals) and saved is not None and set(config.verticals) <= set(saved.experts):
        return saved.model_copy(update={"already_built": True, "built": []})
    missing = [v for v in config.verticals if v not in active]
    report = saved if saved is not None and saved.version == config.version else DemoReport(version=config.version)
    report = report.model_copy(
        update={
            "profile": config.profile,
            "settings": config.settings,
            "seed_share": config.seed_share,
            "seed_holds_lr": config.seed_holds_lr,
            "built": [],
            "already_built": False,
        }
    )
    return _build(home, config, data, missing, report, progress)


def budget_split(lengths: list[int], budget: int | None, share: float) -> tuple[int, int]:
    """(seed end, branch end): row indices that cut a vertical's leading rows within ``budget``
    tokens (as :func:`experts.lora_training.take_tokens` takes them; every row when None) where
    ``share`` of the budget is used. Rows ``[:seed end]`` go to the seed, ``[seed end:branch end]``
    to the vertical's own expert; together they are the rows an expert trained alone would use.
    A vertical with fewer tokens than ``budget`` splits the tokens it has, and its expert keeps
    at least its last row: a seed share taken of a budget the data cannot fill would leave the
    expert nothing of its own to train on."""
    total = sum(lengths) if budget is None else min(budget, sum(lengths))
    seed_end = branch_end = 0
    used = 0
    for length in lengths:
        if used >= total:
            break
        if used < share * total:
            seed_end += 1
        branch_end += 1
        used += length
    return min(seed_end, max(0, branch_end - 1)), branch_end


def seed_and_own_rows(
    config: DemoConfig, data: dict[str, VerticalData], tokenizer: Any
) -> tuple[list[QAPair], dict[str, list[QAPair]]]:
    """(the seed's rows, all verticals shuffled together; each vertical's own rows after the seed)."""
    from experts.chat import encode_pair

    settings, seed_rows, own = config.settings, [], {}
    for vertical in config.verticals:
        train = data[vertical].train[: settings.max_train_rows] if settings.max_train_rows else data[vertical].train
        lengths, used = [], 0
        for pair in train:  # lengths only as far as the budget reaches
            lengths.append(len(encode_pair(tokenizer, pair.question, pair.answer, settings.max_tokens).input_ids))
            used += lengths[-1]
            if settings.train_tokens is not None and used >= settings.train_tokens:
                break
        seed_end, branch_end = budget_split(lengths, settings.train_tokens, config.seed_share)
        seed_rows += train[:seed_end]
        own[vertical] = train[seed_end:branch_end]
    random.Random(settings.seed + 11).shuffle(seed_rows)
    return seed_rows, own


def _seed_adapter(
    home: MoseHome, config: DemoConfig, rows: list[QAPair], model: Any, tokenizer: Any, trunk: Any, progress: bool
) -> tuple[Any, dict | None, SeedResult | None]:
    """(model, seed state dict, result): trained on ``rows``, or loaded from ``MOSE_HOME/demo/seed``
    when the same settings and rows trained it before (an interrupted build resumes with it)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    if not rows:
        return model, None, None
    settings = config.settings.model_copy(
        update={"train_tokens": None, "max_train_rows": None, "lr_decay": not config.seed_holds_lr}
    )
    key = hashlib.sha256(
        (settings.model_dump_json() + "".join(p.question + "\0" + p.answer for p in rows)).encode()
    ).hexdigest()[:16]
    folder = home.root / "demo" / "seed"
    try:
        result = SeedResult.model_validate_json((folder / "seed.json").read_text())
        if result.key == key:
            state = load_file(str(folder / "adapter_model.safetensors"))
            return model, state, result.model_copy(update={"seconds": 0.0})
    except (OSError, ValueError):
        pass
    peft_model, adapter = train_lora(
        model, tokenizer, rows, settings, progress, label="seed (all verticals)", trunk=trunk
    )
    result = SeedResult(
        key=key,
        rows=len(rows),
        train_tokens=adapter.train_tokens,
        steps=len(adapter.train_losses),
        seconds=round(adapter.seconds, 1),
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.state_dict.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "seed.json").write_text(result.model_dump_json(indent=2))
    return peft_model.unload(), adapter.state_dict, result


def _build(
    home: MoseHome,
    config: DemoConfig,
    data: dict[str, VerticalData],
    missing: list[str],
    report: DemoReport,
    progress: bool,
) -> DemoReport:
    started = time.perf_counter()
    settings = config.settings
    model, tokenizer = load_base_for_training(home)
    trunk = new_trunk(model, tokenizer, settings)
    seed_rows, own = seed_and_own_rows(config, data, tokenizer)
    model, seed_state, report.seed = _seed_adapter(home, config, seed_rows, model, tokenizer, trunk, progress)
    branch = settings.model_copy(update={"train_tokens": None, "max_train_rows": None})
    if seed_state is not None:
        branch = branch.model_copy(update={"learning_rate": settings.learning_rate * config.branch_lr_factor})
    report.branch_learning_rate = branch.learning_rate
    for i, vertical in enumerate(missing, 1):
        rows = data[vertical]
        heldout = rows.heldout[: config.eval_rows]
        base_loss = plain_heldout_loss(tokenizer, heldout, settings, trunk)
        peft_model, adapter = train_lora(
            model,
            tokenizer,
            own[vertical],
            branch,
            progress,
            label=f"[{i}/{len(missing)}] {demo_name(vertical)}",
            heldout=heldout,
            trunk=trunk,
            init_state=seed_state,
        )
        model = peft_model.unload()  # LoRA leaves the base weights untouched: reuse them
        result = _result(report.seed, rows, heldout, adapter, base_loss)
        _register(home, config, vertical, adapter, rows.train, result)
        report.experts[vertical] = result
        report.built.append(demo_name(vertical))
        _save(home, report)
    report.seconds = {"total": round(time.perf_counter() - started, 1)}
    _save(home, report)
    losers = [v for v in missing if not report.wins[v]]
    if losers:
        raise MoseError(
            f"demo experts for {', '.join(losers)} do not beat the base model on their own vertical; "
            "run `mose demo build --profile full` to train longer"
        )
    return report


def _result(
    seed: SeedResult | None, rows: VerticalData, heldout: list[QAPair], adapter: Any, base_loss: float
) -> ExpertResult:
    """One expert's result; its curve starts at the base model and counts the seed's steps and tokens."""
    steps, tokens = (seed.steps, seed.train_tokens) if seed else (0, 0)
    curve = [(p.step + steps, p.tokens + tokens, p.heldout_loss) for p in adapter.curve]
    if seed is not None:
        curve.insert(0, (0, 0, base_loss))
    return ExpertResult(
        heldout_loss=adapter.heldout_loss,
        base_heldout_loss=base_loss,
        seed_heldout_loss=adapter.base_heldout_loss if seed else None,
        heldout_rows=len(heldout),
        train_rows=len(rows.train),
        dropped_rows=rows.dropped,
        train_tokens=adapter.train_tokens,
        steps=len(adapter.train_losses),
        seconds=round(adapter.seconds, 1),
        curve=curve,
    )


def _register(
    home: MoseHome, config: DemoConfig, vertical: str, adapter: Any, train: list[QAPair], result: ExpertResult
) -> None:
    metrics = {
        "heldout_loss": result.heldout_loss,
        "base_heldout_loss": result.base_heldout_loss,
        "heldout_rows": result.heldout_rows,
        "train_steps": result.steps,
        "train_tokens": result.train_tokens,
        "final_train_loss": adapter.train_losses[-1],
    }
    if result.seed_heldout_loss is not None:
        metrics["seed_heldout_loss"] = result.seed_heldout_loss
    out = home.root / "demo" / demo_name(vertical)
    manifest = write_expert(
        out,
        demo_name(vertical),
        vertical,
        adapter,
        train,
        metrics,
        config.settings,
        version=config.version,
        owner=DEMO_OWNER,
        license="Apache-2.0",
        description=f"Demo LoRA expert for {vertical.replace('_', ' ')}, fine-tuned on "
        f"{config.data_dir.name}/sft/{vertical}.jsonl (see docs/experts.md "
        "for data sources and licences).",
    )
    register_expert(manifest, home, actor="demo-build")


def _save(home: MoseHome, report: DemoReport) -> None:
    path = report_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(report.model_dump_json(indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------- docs


def _attribution(data_dir: Path) -> str:
    """The 'Sources and licences' section of the data README, kept verbatim."""
    try:
        text = (data_dir / "README.md").read_text(encoding="utf-8")
    except OSError:
        return "See the data README for sources and licences."
    marker = "## Sources and licences"
    return (
        text[text.index(marker) :].replace(marker, "### Sources and licences", 1).strip()
        if marker in text
        else "See the data README for sources and licences."
    )


def curves_table(report: DemoReport) -> str:
    """Markdown table of each expert's held-out loss at its measured points (tokens seen: loss)."""
    lines = ["| vertical | held-out loss by training tokens seen |", "|---|---|"]
    for vertical, result in report.experts.items():
        points = ", ".join(f"{tokens:,}: {loss:.3f}" for _, tokens, loss in result.curve)
        lines.append(f"| {vertical} | {points} |")
    return "\n".join(lines)


def render_docs(report: DemoReport, config: DemoConfig, extra: str = "") -> str:
    """The ``docs/experts.md`` page for a build's report (``extra``: more sections, e.g. a mixture table)."""
    ft = report.settings or config.settings
    wins = sum(report.wins.values())
    seed_text = (
        f"the first {report.seed_share:.0%} of every vertical's tokens, all nine shuffled together, train "
        f"one seed adapter ({report.seed.rows:,} rows, {report.seed.train_tokens:,} tokens, {report.seed.steps} "
        f"steps, peak lr {ft.learning_rate}{', held to the end' if report.seed_holds_lr else ''}); each expert "
        f"starts from the seed and trains on the rest of its own vertical's tokens (peak lr "
        f"{report.branch_learning_rate:g}, decayed to a tenth over them). The verticals share "
        "most of what a 135M model learns from them (the shape of a chat answer), so the seed learns it once "
        "from all of them and each expert spends its own tokens on its vertical "
        "(`docs/decisions/demo-experts-seed.md`)."
        if report.seed
        else f"none: each expert trains from the base model on its own vertical (peak lr {ft.learning_rate})."
    )
    return f"""# Demo experts

`mose demo build` fine-tunes one LoRA expert per vertical of `shared/data/sft/` on
SmolLM2-135M-Instruct, registers and activates them (`demo-<vertical>`, version {report.version}).
`everyday` has no expert: those queries go to the base model. `mose up` builds them with the
`{config.profile}` profile; this page is written by `mose demo docs` from the build's report
(`MOSE_HOME/demo/report.json`).

## Training data

Each source row is shaped into the answer a chat user expects (`experts/sft_data.py`): an MMLU
option completes its stem into a sentence ("Averaging the output of multiple decision trees helps
decrease variance.") or answers a factoid question ("1929."), and MMLU rows that cannot stand
without their options ("Which of the following ...?", "Both of these", one "Wrong, Not wrong"
per scenario) are dropped, as are rows that would teach an expert to copy its question: a stem
of more than 24 words or with a question inside it (a scenario, a passage), and a completion
that adds fewer than two meaningful words to its stem; a GSM8K solution loses its
calculator marks and ends with "The answer is N."; a MedQuAD answer that opens by restating the
question loses that sentence; rows whose answer only restates the question are dropped.
{config.heldout_fraction:.0%} of questions, chosen by a hash of the normalised question, are held
out: never trained on, the same rows for every model compared. Each expert is measured on the
first {config.eval_rows} of them (hash order).

## Held-out answer loss (`{report.profile}` profile)

Mean negative log-likelihood per answer token (lower is better), question chat-formatted, row cut
to {ft.max_tokens} tokens. `base` is SmolLM2-135M-Instruct itself on the same rows.

{results_table(report)}

Experts beating the base model on their own vertical: **{wins} / {len(report.experts)}**.

## Learning curves

Held-out loss by training tokens seen. The first point is the base model; with a seed, the
second is the shared seed adapter (every vertical's tokens counted) and the rest the expert's
own training from it.

{curves_table(report)}

## How they were built

Two phases on the same rows an expert trained alone would use ({ft.train_tokens or 0:,} training
tokens per vertical, {ft.epochs} epoch(s)): {seed_text}

LoRA rank {ft.rank} (alpha {ft.alpha}) on {", ".join(ft.target_modules)} of the last
{ft.top_layers} decoder layers; batches of {ft.batch_size} length-bucketed rows, AdamW with a
short warm-up, then a linear decay to a tenth of the peak (a seed that holds its rate skips the
decay), loss on answer tokens only, seed {ft.seed}. The 20 frozen layers
below the adapters run once per row (`experts/lora_training.py`). Build time on the 2-core CPU:
{report.seconds.get("total", 0):.0f} s for the experts this report's last run built.

{extra}
## Data

{_attribution(config.data_dir)}
"""
