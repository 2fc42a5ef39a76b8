"""Demo experts: one LoRA expert per vertical of ``../shared/data/sft/``, registered and active.

``build_demo`` fine-tunes the missing experts, registers and activates them, and measures the
expert x vertical matrix of held-out answer loss (every expert and the base model on every
vertical's held-out rows, in mixed-adapter batches). It prints the matrix, writes it to
``docs/experts.md`` and to ``MOSE_HOME/demo/matrix.json``. A second run is a no-op.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experts.finetune import (FinetuneConfig, TrainedAdapter, load_base_for_training, load_pairs, register_expert,
                              split_pairs, train_lora, write_expert)
from experts.types import BASE_EXPERT
from registry.errors import MoseError
from registry.home import MoseHome

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "MOSE_SHARED_DATA"
VERTICALS = ("medicine", "law", "finance", "math", "code", "science", "humanities", "social_science",
             "general_knowledge")
DEMO_OWNER = "mose-demo"


def default_data_dir() -> Path:
    """``$MOSE_SHARED_DATA``, else ``<repo>/../shared/data``."""
    return Path(os.environ.get(DATA_ENV) or REPO_ROOT.parent / "shared" / "data")


def demo_name(vertical: str) -> str:
    return "demo-" + vertical.replace("_", "-")


def _demo_finetune() -> FinetuneConfig:
    # Sized so the nine experts and the 10 x 9 matrix fit in ~20 minutes on the 2-core CPU.
    return FinetuneConfig(steps=12, batch_size=4, learning_rate=2e-3, rank=8, alpha=16, top_layers=10,
                          max_tokens=64, heldout_rows=8)


class DemoConfig(BaseModel):
    """What the demo build trains and where it writes."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir, description="Folder holding sft/<vertical>.jsonl.")
    verticals: list[str] = Field(default=list(VERTICALS), description="Verticals that get an expert.")
    finetune: FinetuneConfig = Field(default_factory=_demo_finetune, description="Fine-tune settings per expert.")
    version: str = Field(default="0.1.0", description="Version of the demo experts.")
    docs_path: Path | None = Field(default=REPO_ROOT / "docs" / "experts.md",
                                   description="Where the matrix page is written (None: not written).")


class DemoReport(BaseModel):
    """Result of a demo build."""

    built: list[str] = Field(default_factory=list, description="Experts trained and registered by this run.")
    already_built: bool = Field(default=False, description="True when nothing had to be done.")
    matrix: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                description="Row (expert or 'base') -> vertical -> held-out loss.")
    wins: dict[str, bool] = Field(default_factory=dict, description="Vertical -> its expert beats the base.")
    seconds: dict[str, float] = Field(default_factory=dict, description="Wall time per phase.")
    docs_path: str | None = Field(default=None, description="Page written, if any.")

    def text(self) -> str:
        head = "demo experts already built (nothing to do)" if self.already_built else \
            f"built {len(self.built)} demo expert(s) in {self.seconds.get('total', 0):.0f}s"
        return head + "\n\n" + matrix_table(self.matrix, list(self.wins))


# ---------------------------------------------------------------- the matrix


def matrix_table(matrix: dict[str, dict[str, float]], verticals: list[str]) -> str:
    """Markdown table: one row per expert (and the base), one column per vertical; own vertical in bold."""
    header = "| expert \\ vertical | " + " | ".join(verticals) + " |"
    lines = [header, "|" + "---|" * (len(verticals) + 1)]
    for row, losses in matrix.items():
        cells = []
        for vertical in verticals:
            value = f"{losses[vertical]:.3f}" if vertical in losses else "-"
            cells.append(f"**{value}**" if row == demo_name(vertical) else value)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _matrix(pool: Any, heldout: dict[str, list], config: DemoConfig, progress: bool) -> dict[str, dict[str, float]]:
    from tqdm import tqdm

    rows = [demo_name(v) for v in config.verticals] + [BASE_EXPERT]
    matrix: dict[str, dict[str, float]] = {r: {} for r in rows}
    for vertical in tqdm(config.verticals, desc="held-out matrix", unit="vertical", file=sys.stderr,
                         disable=not progress):
        pairs = [(p.question, p.answer) for p in heldout[vertical]]
        losses = pool.answer_loss(pairs, rows, max_tokens=config.finetune.max_tokens)
        for row in rows:
            matrix[row][vertical] = round(losses[row], 4)
    return matrix


# ---------------------------------------------------------------- build


def _state_path(home: MoseHome) -> Path:
    return home.root / "demo" / "matrix.json"


def _active_demo_versions(registry: Any, config: DemoConfig) -> dict[str, Any]:
    active = {}
    for vertical in config.verticals:
        record = registry.active(demo_name(vertical))
        if record is not None and record.version == config.version:
            active[vertical] = record
    return active


def _saved_report(home: MoseHome, config: DemoConfig) -> DemoReport | None:
    path = _state_path(home)
    try:
        saved = DemoReport.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None
    wanted = {demo_name(v) for v in config.verticals} | {BASE_EXPERT}
    return saved if set(saved.matrix) == wanted else None


def build_demo(home: MoseHome | None = None, config: DemoConfig | None = None, progress: bool = True) -> DemoReport:
    """Train, register and activate the missing demo experts, then measure and record the matrix."""
    from registry import Registry

    home = home or MoseHome.from_env()
    config = config or DemoConfig()
    data = {v: _load_vertical(config, v) for v in config.verticals}
    registry = Registry.open(home)
    try:
        active = _active_demo_versions(registry, config)
        saved = _saved_report(home, config)
        if len(active) == len(config.verticals) and saved is not None and all(saved.wins.values()):
            return saved.model_copy(update={"already_built": True, "built": []})
        return _build(home, registry, config, data, active, progress)
    finally:
        registry.close()


def _load_vertical(config: DemoConfig, vertical: str) -> tuple[list, list, list]:
    path = config.data_dir / "sft" / f"{vertical}.jsonl"
    if not path.is_file():
        raise MoseError(f"demo data {path} not found: pass --data DIR (the folder holding sft/) or set {DATA_ENV}")
    pairs = load_pairs(path)
    train, heldout = split_pairs(pairs, config.finetune.heldout_rows, config.finetune.seed)
    return pairs, train, heldout


def _build(home: MoseHome, registry: Any, config: DemoConfig, data: dict, active: dict, progress: bool) -> DemoReport:
    from experts.pool import ExpertPool

    started = time.perf_counter()
    trained: dict[str, TrainedAdapter] = {}
    missing = [v for v in config.verticals if v not in active]
    if missing:
        model, tokenizer = load_base_for_training(home)
        for i, vertical in enumerate(missing, 1):
            _, train, _ = data[vertical]
            peft_model, trained[vertical] = train_lora(model, tokenizer, train, config.finetune, progress,
                                                       label=f"[{i}/{len(missing)}] {demo_name(vertical)}")
            model = peft_model.unload()  # LoRA leaves the base weights untouched: reuse them
        del model
    train_seconds = time.perf_counter() - started

    pool = ExpertPool(home=home)
    for vertical in config.verticals:
        if vertical in trained:
            pool.add_adapter(demo_name(vertical), trained[vertical].lora_config, trained[vertical].state_dict)
        else:
            pool.add_registered(registry, active[vertical])
    matrix_started = time.perf_counter()
    matrix = _matrix(pool, {v: data[v][2] for v in config.verticals}, config, progress)
    matrix_seconds = time.perf_counter() - matrix_started

    for vertical in missing:
        pairs = data[vertical][0]
        metrics = {"heldout_loss": matrix[demo_name(vertical)][vertical],
                   "base_heldout_loss": matrix[BASE_EXPERT][vertical],
                   "heldout_rows": len(data[vertical][2]), "train_steps": config.finetune.steps,
                   "final_train_loss": trained[vertical].train_losses[-1]}
        out = home.root / "demo" / demo_name(vertical)
        manifest = write_expert(out, demo_name(vertical), vertical, trained[vertical], pairs, metrics,
                                config.finetune, version=config.version, owner=DEMO_OWNER,
                                license="Apache-2.0",
                                description=f"Demo LoRA expert for {vertical.replace('_', ' ')}, fine-tuned on "
                                            f"{config.data_dir.name}/sft/{vertical}.jsonl (see docs/experts.md "
                                            "for data sources and licences).")
        register_expert(manifest, home, actor="demo-build")

    total = time.perf_counter() - started
    report = DemoReport(
        built=[demo_name(v) for v in missing], matrix=matrix,
        wins={v: matrix[demo_name(v)][v] < matrix[BASE_EXPERT][v] for v in config.verticals},
        seconds={"train": round(train_seconds, 1), "matrix": round(matrix_seconds, 1), "total": round(total, 1)},
    )
    if config.docs_path is not None:
        write_docs(config.docs_path, report, config)
        report.docs_path = str(config.docs_path)
    path = _state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.model_dump_json(indent=2))
    losers = [v for v, won in report.wins.items() if not won]
    if losers:
        raise MoseError(f"demo experts for {', '.join(losers)} do not beat the base model on their own vertical; "
                        "raise --steps and run `mose demo build` again")
    return report


# ---------------------------------------------------------------- docs


def _attribution(data_dir: Path) -> str:
    """The 'Sources and licences' section of the data README, kept verbatim."""
    try:
        text = (data_dir / "README.md").read_text(encoding="utf-8")
    except OSError:
        return "See the data README for sources and licences."
    marker = "## Sources and licences"
    return text[text.index(marker):].replace(marker, "### Sources and licences", 1).strip() \
        if marker in text else "See the data README for sources and licences."


def write_docs(path: Path, report: DemoReport, config: DemoConfig) -> None:
    ft = config.finetune
    wins = sum(report.wins.values())
    body = f"""# Demo experts

`mose demo build` fine-tunes one LoRA expert per vertical of `shared/data/sft/` on
SmolLM2-135M-Instruct, registers and activates them (`demo-<vertical>`, version {config.version}).
`everyday` has no expert: those queries go to the base model.

## Held-out answer loss (expert x vertical)

Mean negative log-likelihood per answer token (lower is better) on each vertical's
{ft.heldout_rows} held-out rows (never trained on), question chat-formatted, truncated to
{ft.max_tokens} tokens. Own vertical in bold. The `base` row is SmolLM2-135M-Instruct itself.

{matrix_table(report.matrix, config.verticals)}

Experts beating the base model on their own vertical: **{wins} / {len(report.wins)}**.

## How they were built

LoRA rank {ft.rank} (alpha {ft.alpha}) on {", ".join(ft.target_modules)} of the last
{ft.top_layers} decoder layers; {ft.steps} steps of {ft.batch_size} pairs, AdamW lr {ft.learning_rate},
loss on answer tokens only, seed {ft.seed}. Build time on the 2-core CPU (shared with other jobs
while measured, so figures may be inflated): training {report.seconds.get('train', 0):.0f} s,
matrix {report.seconds.get('matrix', 0):.0f} s, total {report.seconds.get('total', 0):.0f} s.
Re-running `mose demo build` is a no-op once the experts are active.

## Data

{_attribution(config.data_dir)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
