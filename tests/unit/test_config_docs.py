"""Config drives the command line and the reference docs: flags derived from the config fields
(type, default and help from the field's docstring), and the field tables of docs/operations.md
rendered from the same classes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from experts.finetune import FinetuneConfig
from jury.calibrator import CalibratorConfig
from registry.errors import MoseError
from router_model.config import RouterConfig
from serve import cli
from serve.commands._config_args import (
    add_config_arguments,
    config_from_args,
    documented_configs,
    render_document,
    render_table,
    table_rows,
)
from serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "operations.md"


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    port: int = Field(8000, ge=1)
    """Port to bind."""


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    steps: int | None = Field(30, ge=1)
    """Optimizer steps to run."""

    rate: float = 1e-3
    """Learning rate."""

    mode: Literal["auto", "yes", "no"] = "auto"
    """How to choose."""

    quantize: bool = True
    """Quantise the graph."""

    weights: tuple[float, ...] = (0.0, 0.5)
    """Weights tried."""

    inner: Inner = Field(default_factory=Inner)
    """A section."""


FIELDS = ("steps", "rate", "mode", "quantize", "weights", "inner.port")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_config_arguments(parser, Example, FIELDS, names={"rate": ("--rate", "--lr")})
    return parser


def test_help_holds_the_docstring_and_the_default():
    text = parser().format_help()
    for line in (
        "Optimizer steps to run. (default: 30)",
        "Learning rate. (default: 0.001)",
        "How to choose. (default: auto)",
        "Weights tried. (default: 0.0 0.5)",
        "Port to bind. (default: 8000)",
    ):
        assert line in " ".join(text.split()), line
    assert "--quantize, --no-quantize" in text and "{auto,yes,no}" in text


def test_absent_flags_keep_the_defaults():
    config = config_from_args(Example, parser().parse_args([]))
    assert config == Example()


def test_given_flags_override():
    args = parser().parse_args(
        ["--steps", "5", "--lr", "0.5", "--mode", "no", "--no-quantize", "--weights", "0", "1", "--port", "9000"]
    )
    config = config_from_args(Example, args)
    assert (config.steps, config.rate, config.mode, config.quantize, config.weights, config.inner.port) == (
        5,
        0.5,
        "no",
        False,
        (0.0, 1.0),
        9000,
    )
    assert config_from_args(Example, parser().parse_args([]), base={"rate": 0.2}, steps=None).model_dump() == {
        **Example().model_dump(),
        "rate": 0.2,
        "steps": None,
    }


def test_a_bad_value_is_a_clear_error(capsys):
    with pytest.raises(
        MoseError, match=r"invalid example settings: steps: Input should be greater than or equal to 1 \(got 0\)"
    ):
        config_from_args(Example, parser().parse_args(["--steps", "0"]), what="example settings")
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["--mode", "maybe"])
    assert exit_info.value.code == 2 and "invalid choice: 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, config_cls, expected", [
    (["expert", "finetune", "--help"], FinetuneConfig, ["--lr", "--learning-rate", "--heldout", "--top-layers"]),
    (["router", "train", "--help"], RouterConfig, ["--epochs", "--fine-tune", "--max-rows-per-label", "--neighbours"]),
    (["crosscheck", "train", "--help"], CalibratorConfig, ["--target-flag-precision", "--probe-layer", "--no-probe",
                                                           "--recalibrate", "--average-probe-folds",
                                                           "--plausibility-strength", "--no-probe-negatives",
                                                           "--no-probe-candidate"]),
    (["serve", "--help"], ServeConfig, ["--host", "--port", "--address"]),
])  # fmt: skip
def test_commands_take_their_flags_from_the_configs(capsys, argv, config_cls, expected):
    with pytest.raises(SystemExit):
        cli.main(argv)
    text = " ".join(capsys.readouterr().out.split())
    for flag in expected:
        assert flag in text
    assert "(default: " in text


def test_command_flags_build_the_configs():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "expert",
            "finetune",
            "--data",
            "d",
            "--domain",
            "law",
            "--name",
            "x",
            "--lr",
            "0.01",
            "--heldout",
            "4",
            "--top-layers",
            "3",
        ]
    )
    config = config_from_args(FinetuneConfig, args)
    assert (config.learning_rate, config.heldout_rows, config.top_layers, config.steps) == (0.01, 4, 3, 30)
    args = parser.parse_args(["router", "train", "--epochs", "3", "--fine-tune", "no", "--no-lexical-bag"])
    assert config_from_args(RouterConfig, args) == RouterConfig(epochs=3, fine_tune="no", lexical_bag=False)
    args = parser.parse_args(
        ["crosscheck", "train", "--data", "d", "--average-probe-folds", "--recalibrate", "--probe-layer", "18"]
    )
    config = config_from_args(CalibratorConfig, args)
    assert (config.probe_average_folds, config.recalibrate, config.probe_layer) == (True, True, 18)


def test_serve_flags_override_the_server_config(monkeypatch):
    from serve.commands.serve import _load, serve_namespace

    monkeypatch.delenv("MOSE_SERVE__HTTP__HOST", raising=False)
    monkeypatch.delenv("MOSE_SERVE__HTTP__PORT", raising=False)
    config = _load(cli.build_parser().parse_args(["serve", "--port", "9100", "--address", "auto"]))
    assert (config.http.host, config.http.port, config.ray.address) == ("127.0.0.1", 9100, "auto")
    assert _load(serve_namespace(None, None, 9200)).http.port == 9200


def test_the_docs_tables_are_current():
    text = OPERATIONS.read_text(encoding="utf-8")
    for name in documented_configs():
        assert f"<!-- config-table:{name} -->" in text
    assert render_document(text, documented_configs()) == text, (
        "docs/operations.md's config tables are out of date: run scripts/render_config_docs"
    )


def test_a_table_lists_every_field_with_its_default():
    table = render_table(RouterConfig)
    for name, info in RouterConfig.model_fields.items():
        assert f"| `{name}` |" in table and info.description
    assert "| `epochs` | int | `2` | Passes over the training rows" in table
    assert "| `pool.max_batch_size` | int | `16` |" in render_table(ServeConfig)


def test_the_served_pool_and_the_library_pool_share_their_batch_default():
    from experts.pool import PoolConfig
    from serve.config import ServeConfig

    assert ServeConfig().pool.max_batch_size == PoolConfig().max_batch_size


def test_the_render_script_checks_and_rewrites(tmp_path):
    doc = tmp_path / "ops.md"
    doc.write_text("intro\n<!-- config-table:RouterConfig -->\nstale\n<!-- /config-table -->\nend\n")
    script = [sys.executable, str(REPO / "scripts" / "render_config_docs")]
    assert subprocess.run([*script, "--check", str(doc)], capture_output=True).returncode == 1
    assert subprocess.run([*script, str(doc)], capture_output=True).returncode == 0
    assert subprocess.run([*script, "--check", str(doc)], capture_output=True).returncode == 0
    assert render_table(RouterConfig) in doc.read_text()


@pytest.mark.parametrize("config_cls", list(documented_configs().values()), ids=lambda cls: cls.__name__)
def test_every_config_field_has_a_docstring(config_cls):
    missing = [name for name, _kind, _default, text in table_rows(config_cls) if not text]
    assert not missing, f"{config_cls.__name__}: fields without a docstring: {missing}"
