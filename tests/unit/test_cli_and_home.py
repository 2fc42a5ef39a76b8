"""The CLI framework and the data directory: the parts every command relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from registry.errors import MoseError
from registry.home import MoseHome
from serve import cli


def test_home_defaults_to_dot_mose_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MOSE_HOME", raising=False)
    monkeypatch.delenv("MOSE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert MoseHome.from_env().root == tmp_path / ".mose"
    monkeypatch.setenv("MOSE_HOME", str(tmp_path / "elsewhere"))
    home = MoseHome.from_env()
    assert home.root == tmp_path / "elsewhere"
    assert home.cache_dir == tmp_path / "elsewhere" / "cache"
    assert home.cache_dir.is_dir()


def test_cache_env_shares_base_weights_between_homes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSE_CACHE", str(tmp_path / "shared-cache"))
    a = MoseHome.from_env(tmp_path / "a")
    b = MoseHome.from_env(tmp_path / "b")
    assert a.cache_dir == b.cache_dir == tmp_path / "shared-cache"
    assert a.artifacts_dir != b.artifacts_dir


def test_explicit_root_beats_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSE_HOME", str(tmp_path / "env"))
    assert MoseHome.from_env(tmp_path / "arg").root == tmp_path / "arg"


def test_help_lists_command_groups():
    out = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for group in ("up", "models", "expert", "keys", "audit", "demo", "router", "crosscheck", "serve"):
        assert group in out


def test_mose_error_becomes_one_line_and_exit_2(capsys, monkeypatch):
    def failing(_args):
        raise MoseError("the thing is wrong; do X instead")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser, failing))
    assert cli.main(["up"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the thing is wrong; do X instead\n"


def test_unknown_command_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "serve.cli", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_offline_environment_is_set_by_main(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cli.set_offline_env()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _with_handler(parser, handler):
    parser.set_defaults(func=handler)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=handler)
    return parser


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--probe-layer", "-1"], "probe_layer: Input should be greater than or equal to 0 (got -1)"),
        (["--target-flag-precision", "2"], "target_flag_precision: Input should be less than or equal to 1 (got 2.0)"),
    ],
)
def test_bad_calibrator_settings_fail_before_anything_loads(tmp_path, capsys, flags, message):
    home = tmp_path / "home"
    code = cli.main(["crosscheck", "train", "--data", str(tmp_path / "missing.jsonl"), "--home", str(home), *flags])
    assert code == 2
    assert capsys.readouterr().err == f"error: invalid calibrator settings: {message}\n"
    assert not home.exists()  # nothing was created or loaded


def test_up_names_the_precision_models_run_in(monkeypatch):
    import torch

    from serve.commands.up import _precision

    if torch.cuda.is_available():
        pytest.skip("names the CUDA dtype on a GPU machine")
    for dtype in ("bfloat16", "float32"):
        monkeypatch.setenv("MOSE_CPU_DTYPE", dtype)
        assert _precision() == f"cpu in {dtype}"
