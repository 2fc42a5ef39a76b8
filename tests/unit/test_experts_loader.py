"""Safe loading: only verified bytes from the artifact store; tampering quarantines the expert."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from experts.loader import load_lora, lora_config_from_dict, read_verified
from registry.errors import ArtifactError
from tests._fixtures.experts import write_lora_expert


def _register(registry, tmp_path, name="law-expert"):
    manifest = write_lora_expert(tmp_path / "src", name)
    record = registry.add(manifest, actor="tests")
    return registry.activate(record.name, actor="tests")


def test_registered_lora_loads_from_verified_bytes(registry, tmp_path):
    record = _register(registry, tmp_path)
    config, state = load_lora(registry, record)
    assert config.r == 4 and config.inference_mode
    assert any(k.endswith("lora_B.weight") for k in state) and len(state) == 120
    assert registry.get(record.name).status == "active"


def test_tampered_artifact_is_refused_quarantined_and_audited(registry, tmp_path):
    record = _register(registry, tmp_path)
    blob = registry.blob_paths(record)["adapter_model.safetensors"]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # flip one weight byte: still a valid safetensors file
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as err:
        load_lora(registry, record)
    message = str(err.value)
    assert message.startswith("law-expert@0.1.0: adapter_model.safetensors does not match its registered sha256")
    assert "quarantined" in message
    assert registry.get("law-expert").status == "quarantined"
    last = registry.audit_entries()[-1]
    assert last.action in ("quarantine", "status") and "law-expert@0.1.0" in last.subject
    assert "adapter_model.safetensors" in str(last.details)
    assert registry.audit_verify().ok
    # the other file and the registry row are intact
    assert registry.get("law-expert").manifest.files == record.manifest.files


def test_missing_blob_is_refused_and_quarantined(registry, tmp_path):
    record = _register(registry, tmp_path)
    registry.blob_paths(record)["adapter_config.json"].unlink()
    with pytest.raises(ArtifactError, match=r"adapter_config.json is missing from the artifact store"):
        read_verified(registry, record)
    assert registry.get("law-expert").status == "quarantined"


def test_registry_refuses_pickles_so_they_never_reach_the_loader(registry, tmp_path):
    from registry.manifest import ExpertManifest, dump_manifest

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"w": [1.0]}))
    manifest = ExpertManifest(
        name="pickled",
        version="0.1.0",
        kind="lora",
        base_model="smollm2-135m-instruct",
        files={"adapter_model.bin": hashlib.sha256((folder / "adapter_model.bin").read_bytes()).hexdigest()},
        domains=["law"],
        description="d",
        owner="o",
        license="MIT",
        example_queries=[f"q{i}" for i in range(20)],
        resources={"memory_mb": 1},
    )
    dump_manifest(manifest, folder / "manifest.yaml")
    with pytest.raises(ArtifactError, match="pickled weights"):
        registry.add(folder / "manifest.yaml")
    assert registry.list() == []


class _StoreWithoutChecks:
    """Stands in for a registry whose registration checks were bypassed (defence in depth)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.quarantined: list[str] = []

    def blob_paths(self, record):
        return self.files

    def quarantine(self, name, version, reason, actor):
        self.quarantined.append(reason)


def _record_for(files: dict[str, Path]):
    digests = {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in files.items()}
    return SimpleNamespace(name="sneaky", version="0.1.0", status="active", manifest=SimpleNamespace(files=digests))


@pytest.mark.parametrize(
    ("relpath", "content", "message"),
    [
        ("adapter_model.bin", pickle.dumps({"w": 1}), "has file type .bin; the loader only reads"),
        ("weights.pt", b"PK\x03\x04zip", "has file type .pt; the loader only reads"),
        ("config.json", pickle.dumps({"w": 1}), "holds a pickle/zip archive"),
        ("adapter_config.json", b'{"peft_type": "LORA", "auto_map": {"AutoModel": "evil.Model"}}', "sets 'auto_map'"),
        ("config.json", b'{"model_type": "llama", "trust_remote_code": true}', "sets 'trust_remote_code'"),
        ("adapter_model.safetensors", pickle.dumps({"w": 1}), "is not a valid safetensors file"),
    ],
)
def test_loader_refuses_pickles_and_remote_code_even_if_they_got_in(tmp_path, relpath, content, message):
    path = tmp_path / relpath
    path.write_bytes(content)
    files = {relpath: path}
    store = _StoreWithoutChecks(files)
    with pytest.raises(ArtifactError, match=message):
        verified = read_verified(store, _record_for(files))
        verified.tensors(relpath)  # reached only for safetensors-named files
    assert store.quarantined == []  # digests matched: refused for what it is, not for tampering


def test_non_lora_adapter_config_is_refused():
    with pytest.raises(ArtifactError, match=r"x@1: adapter_config.json has peft_type 'IA3'; only LoRA"):
        lora_config_from_dict("x@1", {"peft_type": "IA3"})
