"""Each bad registration is refused with its exact message and leaves the registry unchanged.

"Unchanged" (see ``registry_state``): same experts and statuses, audit chain valid with the same
number of entries, no new blob, no temp file left behind.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from registry import ExpertManifest, Registry, RegistrySettings
from registry.errors import ArtifactError, ConflictError, ManifestError, SignatureError
from registry.manifest import dump_manifest, load_manifest
from registry.signing import generate_keypair, load_private_key, load_public_key, public_key_b64, sign_manifest
from tests._fixtures.registry import assert_refused, build_lora_expert, sha256_of, write_manifest

ALLOWED = (
    "name, version, kind, base_model, files, domains, description, owner, license, example_queries, "
    "quantization, resources, metrics, signature"
)


def _rewrite(expert, **changes):
    manifest = {**expert.manifest, **changes}
    write_manifest(expert.manifest_path, manifest)
    return manifest


def test_valid_registration_is_pending_with_blobs_and_audit(registry, lora_expert):
    record = registry.add(lora_expert.manifest_path)
    assert (record.ref, record.status, record.kind, record.domains) == ("demo-law@1.0.0", "pending", "lora", ["law"])
    blobs = registry.blob_paths(record)
    for rel, path in blobs.items():
        assert sha256_of(path) == lora_expert.manifest["files"][rel]
        assert path.read_bytes() == (lora_expert.root / rel).read_bytes()
    entries = registry.audit_entries()
    assert [(e.action, e.subject) for e in entries] == [("register", "demo-law@1.0.0")]
    assert entries[0].details["files"] == lora_expert.manifest["files"]
    assert registry.audit_verify().ok


def test_malformed_yaml(seeded_registry, lora_expert):
    lora_expert.manifest_path.write_text("name: demo-law\nversion: 1.0.0\nexample_queries: [a, b\n")
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: not valid YAML (line 4, column 1): expected ',' or ']', but got '<stream end>' "
        "while parsing a flow sequence",
    )


def test_manifest_that_is_not_a_mapping(seeded_registry, lora_expert):
    lora_expert.manifest_path.write_text("- demo-law\n- 1.0.0\n")
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: the manifest must be a mapping of fields (name, version, ...), got list",
    )


def test_missing_fields(seeded_registry, lora_expert):
    manifest = dict(lora_expert.manifest)
    del manifest["license"], manifest["owner"]
    write_manifest(lora_expert.manifest_path, manifest)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: owner: required field is missing; license: required field is missing",
    )


def test_unknown_field(seeded_registry, lora_expert):
    _rewrite(lora_expert, homepage="https://example.org")
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        f"manifest.yaml: homepage: unknown field (allowed fields: {ALLOWED})",
    )


def test_unknown_nested_field(seeded_registry, lora_expert):
    _rewrite(lora_expert, resources={"memory_mb": 4, "gpus": 1})
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: resources.gpus: unknown field",
    )


def test_fewer_than_20_example_queries(seeded_registry, tmp_path):
    expert = build_lora_expert(tmp_path / "few", queries=5)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(expert.manifest_path),
        ManifestError,
        "manifest.yaml: example_queries: at least 20 example queries are needed (got 5)",
    )


def test_blank_example_query(seeded_registry, lora_expert):
    _rewrite(lora_expert, example_queries=[*lora_expert.manifest["example_queries"][:-1], "   "])
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: example_queries: example query 21 is empty",
    )


def test_lora_without_base_model_and_bad_name_and_version(seeded_registry, lora_expert):
    manifest = dict(lora_expert.manifest, name="Demo Law", version="1.0")
    manifest.pop("base_model")
    write_manifest(lora_expert.manifest_path, manifest)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: name: must be a lowercase slug of letters, digits, '-' or '_' (e.g. demo-law); "
        "version: must be a semantic version MAJOR.MINOR.PATCH (e.g. 1.0.0)",
    )
    manifest["name"], manifest["version"] = "demo-law", "1.0.0"
    write_manifest(lora_expert.manifest_path, manifest)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: base_model: required for a lora expert (e.g. smollm2-135m-instruct)",
    )


def test_path_escaping_the_folder(seeded_registry, lora_expert):
    files = dict(lora_expert.manifest["files"])
    files["../secrets.json"] = files.pop("adapter_config.json")
    _rewrite(lora_expert, files=files)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: files: '../secrets.json' must be a relative path inside the expert folder "
        "(no absolute path, no '..')",
    )


def test_digest_mismatch_names_file_and_both_digests(seeded_registry, lora_expert):
    weights = lora_expert.root / "adapter_model.safetensors"
    expected = lora_expert.manifest["files"]["adapter_model.safetensors"]
    build_lora_expert(lora_expert.root, seed=7)  # same names, other random weights
    write_manifest(lora_expert.manifest_path, lora_expert.manifest)  # manifest keeps the old digest
    actual = sha256_of(weights)
    assert actual != expected
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        f"adapter_model.safetensors: sha256 mismatch: the manifest says {expected}, the file has {actual}; "
        "fix the file or put its real digest in the manifest",
    )


def test_torch_bin_pickle_is_refused(seeded_registry, lora_expert):
    torch = pytest.importorskip("torch")
    path = lora_expert.root / "pytorch_model.bin"
    torch.save({"w": torch.zeros(4, 4)}, path)
    _rewrite(lora_expert, files={**lora_expert.manifest["files"], "pytorch_model.bin": sha256_of(path)})
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        "pytorch_model.bin: .bin files hold pickled weights, which can run code when loaded; convert them "
        "to safetensors (e.g. model.save_pretrained(..., safe_serialization=True))",
    )


def test_pickle_disguised_as_safetensors_is_refused(seeded_registry, lora_expert):
    weights = lora_expert.root / "adapter_model.safetensors"
    weights.write_bytes(pickle.dumps({"w": np.zeros((4, 4), dtype=np.float32)}, protocol=4))
    _rewrite(lora_expert, files={**lora_expert.manifest["files"], "adapter_model.safetensors": sha256_of(weights)})
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        "adapter_model.safetensors: contains a Python pickle, which can run code when loaded; "
        "only safetensors weights are accepted",
    )


def test_safetensors_whose_header_length_looks_like_pickle_magic_is_accepted(registry, lora_expert):
    """A header of 0x0280..0x05ff bytes starts the file with 0x80 0x02..0x05 (pickle's magic)."""
    from safetensors.numpy import load_file, save_file

    weights = lora_expert.root / "adapter_model.safetensors"
    tensors, pad = load_file(str(weights)), 0
    while not ((head := weights.read_bytes()[:2])[0] == 0x80 and 2 <= head[1] <= 5):
        pad += 8
        save_file(tensors, str(weights), metadata={"pad": "x" * pad})
    _rewrite(lora_expert, files={**lora_expert.manifest["files"], "adapter_model.safetensors": sha256_of(weights)})
    record = registry.add(lora_expert.manifest_path)
    assert record.status == "pending"
    assert registry.verify_files(record.name).ok


def test_truncated_safetensors_is_refused(seeded_registry, lora_expert):
    weights = lora_expert.root / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _rewrite(lora_expert, files={**lora_expert.manifest["files"], "adapter_model.safetensors": sha256_of(weights)})
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        "adapter_model.safetensors: not a valid safetensors file (the tensor table does not match the data)",
    )


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}}, "auto_map"),
        ({"nested": {"trust_remote_code": True}}, "trust_remote_code"),
    ],
)
def test_config_asking_for_remote_code_is_refused(seeded_registry, lora_expert, extra, key):
    config = lora_expert.root / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **extra}))
    _rewrite(lora_expert, files={**lora_expert.manifest["files"], "adapter_config.json": sha256_of(config)})
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        f"adapter_config.json: sets {key!r}, which makes transformers run code shipped with the model; "
        "experts must use the library's built-in architectures: remove it",
    )


def test_python_file_is_refused(seeded_registry, lora_expert):
    code = lora_expert.root / "modeling_evil.py"
    code.write_text("import os\n")
    _rewrite(lora_expert, files={**lora_expert.manifest["files"], "modeling_evil.py": sha256_of(code)})
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        "modeling_evil.py: code files are not accepted; an expert must load without custom code",
    )


def test_symlink_is_refused(seeded_registry, lora_expert, tmp_path):
    weights = lora_expert.root / "adapter_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    os.symlink(outside, weights)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        "adapter_model.safetensors: is a symbolic link; copy the real file into the expert folder",
    )


def test_missing_file_is_refused(seeded_registry, lora_expert):
    (lora_expert.root / "adapter_config.json").unlink()
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ArtifactError,
        f"adapter_config.json: listed in the manifest but not found at {lora_expert.root / 'adapter_config.json'}",
    )


def test_same_version_other_digests_is_a_conflict_and_same_digests_a_no_op(seeded_registry, tmp_path):
    first = build_lora_expert(tmp_path / "v1", name="dup-law", seed=1)
    record = seeded_registry.add(first.manifest_path)
    entries = seeded_registry.audit_verify().entries
    again = seeded_registry.add(first.manifest_path)
    assert again == record and seeded_registry.audit_verify().entries == entries

    other = build_lora_expert(tmp_path / "v1b", name="dup-law", seed=2)
    old = first.manifest["files"]["adapter_model.safetensors"][:12]
    new = other.manifest["files"]["adapter_model.safetensors"][:12]
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(other.manifest_path),
        ConflictError,
        f"dup-law@1.0.0 is already registered with other files (adapter_model.safetensors: registered {old}, "
        f"new {new}); a registered version never changes: publish these files under a new version",
    )
    assert seeded_registry.get("dup-law").manifest.files == first.manifest["files"]


def test_unknown_domain_lists_known_domains(seeded_registry, tmp_path):
    expert = build_lora_expert(tmp_path / "astro", name="astro", domains=("astrology",))
    known = ", ".join(seeded_registry.taxonomy.known())
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(expert.manifest_path),
        ManifestError,
        f"manifest.yaml: domains: unknown domain 'astrology'. Known domains: {known}. "
        "A new domain can be added with `mose expert domains --add NAME [--parent PARENT]`.",
    )
    seeded_registry.add_domain("astrology", parent="humanities")
    assert seeded_registry.add(expert.manifest_path).domains == ["astrology"]


def test_manifest_object_needs_files_dir(seeded_registry, lora_expert):
    manifest = load_manifest(lora_expert.manifest_path)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(manifest),
        ManifestError,
        "files_dir is needed to register a manifest object (the folder holding its files)",
    )
    assert seeded_registry.add(manifest, files_dir=lora_expert.root).ref == "demo-law@1.0.0"


# ------------------------------------------------------------------------------- signatures
@pytest.fixture
def signing(mose_home, seeded_registry):
    """A team key pair and a registry (same home) that requires signatures and trusts the team."""
    pair = generate_keypair("law-team", mose_home.keys_dir)
    settings = RegistrySettings(require_signatures=True, trusted_keys={"law-team": pair.public_key_b64})
    strict = Registry.open(mose_home, settings=settings)
    yield pair, strict
    strict.close()


def _sign_file(expert, key_path, team="law-team") -> ExpertManifest:
    signed = sign_manifest(load_manifest(expert.manifest_path), load_private_key(key_path), team)
    dump_manifest(signed, expert.manifest_path)
    return signed


def test_missing_signature_refused_when_required(signing, lora_expert):
    _, strict = signing
    assert_refused(
        strict,
        lambda: strict.add(lora_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: this registry requires signed manifests and this one has no signature; "
        "sign it with `mose expert sign MANIFEST --key TEAM.key`",
    )


def test_tampered_signed_manifest_refused(signing, lora_expert):
    pair, strict = signing
    signed = _sign_file(lora_expert, pair.private_key)
    tampered = signed.model_copy(update={"description": "Now claims to do medicine too."})
    dump_manifest(tampered, lora_expert.manifest_path)
    assert_refused(
        strict,
        lambda: strict.add(lora_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the signature of team 'law-team' does not match the manifest (it was changed after "
        "signing, or signed with another key); sign it again",
    )


def test_signature_by_untrusted_team_refused(signing, lora_expert, mose_home):
    _, strict = signing
    rogue = generate_keypair("rogue-team", mose_home.keys_dir)
    _sign_file(lora_expert, rogue.private_key, team="rogue-team")
    assert_refused(
        strict,
        lambda: strict.add(lora_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: signed by team 'rogue-team', whose key is not trusted by this registry (trusted teams: "
        "law-team); ask the operator to add it to trusted_keys in registry.yaml",
    )


def test_signature_with_wrong_key_for_team_refused(signing, lora_expert, mose_home):
    _, strict = signing
    impostor = generate_keypair("impostor", mose_home.keys_dir)
    _sign_file(lora_expert, impostor.private_key, team="law-team")
    assert_refused(
        strict,
        lambda: strict.add(lora_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the signature of team 'law-team' does not match the manifest (it was changed after "
        "signing, or signed with another key); sign it again",
    )


def test_good_signature_accepted_and_recorded(signing, lora_expert):
    pair, strict = signing
    _sign_file(lora_expert, pair.private_key)
    record = strict.add(lora_expert.manifest_path)
    assert record.manifest.signature.team == "law-team"
    assert strict.audit_entries()[-1].details["signature"] == "verified"
    assert strict.audit_verify().ok


def test_unsigned_accepted_when_not_required(registry, lora_expert):
    registry.add(lora_expert.manifest_path)
    assert registry.audit_entries()[-1].details["signature"] == "unsigned"


def test_settings_file_and_env(mose_home, monkeypatch):
    pair = generate_keypair("law-team", mose_home.keys_dir)
    (mose_home.root / "registry.yaml").write_text("trusted_keys:\n  law-team: keys/law-team.pub\n")
    settings = RegistrySettings.load(mose_home)
    assert settings.require_signatures is False
    assert public_key_b64(load_public_key(settings.trusted_keys["law-team"])) == pair.public_key_b64
    monkeypatch.setenv("MOSE_REQUIRE_SIGNATURES", "1")
    assert RegistrySettings.load(mose_home).require_signatures is True


def test_lora_without_adapter_config_is_refused(seeded_registry, lora_expert):
    files = dict(lora_expert.manifest["files"])
    del files["adapter_config.json"]
    _rewrite(lora_expert, files=files)
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: files: a lora expert needs adapter_config.json and its weights as .safetensors "
        "(Hugging Face peft layout)",
    )


def test_non_finite_metric_is_refused(seeded_registry, lora_expert):
    lora_expert.manifest_path.write_text(
        lora_expert.manifest_path.read_text().replace("heldout_loss: 1.5", "heldout_loss: .nan")
    )
    assert_refused(
        seeded_registry,
        lambda: seeded_registry.add(lora_expert.manifest_path),
        ManifestError,
        "manifest.yaml: metrics.heldout_loss: Input should be a finite number",
    )
