"""OpenSSF Model Signing bundles: interop with the ``model-signing`` library both ways, and every
refusal names the file (or says the bundle is for other files), with real P-256 keys and real
expert folders."""

from __future__ import annotations

import base64
import json
import shutil

import model_signing
import pytest

from registry import Registry, RegistrySettings, oms
from registry.errors import SignatureError
from registry.manifest import dump_manifest, load_manifest
from registry.signing import generate_keypair as generate_ed25519_keypair
from registry.signing import load_private_key as load_ed25519_key
from registry.signing import sign_manifest
from registry.teams import Principal
from tests._fixtures.registry import assert_refused, build_lora_expert, sha256_of


@pytest.fixture
def law_key(mose_home) -> oms.P256KeyPair:
    return oms.generate_keypair("law-team", mose_home.keys_dir)


def _keys(pair: oms.P256KeyPair) -> dict[str, str]:
    return {pair.team: pair.public_key.read_text()}


def _library_sign(folder, private_key, bundle=None, ignore=()):
    """Sign as the library's own CLI does (`model_signing sign key`): the bundle's path ignored."""
    bundle = bundle or folder / oms.BUNDLE_NAME
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[bundle.name, *ignore])
    model_signing.signing.Config().set_hashing_config(hashing).use_elliptic_key_signer(private_key=private_key).sign(
        folder, bundle
    )
    return bundle


def _refusal(call) -> str:
    with pytest.raises(SignatureError) as caught:
        call()
    return str(caught.value)


# ------------------------------------------------------------------------------------- interop
def test_bundle_mose_writes_verifies_with_the_library_verifier(lora_expert, law_key):
    signed = oms.sign_folder(lora_expert.root, None, law_key.private_key)
    assert signed.bundle == lora_expert.root / "model.sig"
    assert signed.files == {
        rel: sha256_of(lora_expert.root / rel)
        for rel in ("adapter_config.json", "adapter_model.safetensors", "manifest.yaml")
    }
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=law_key.public_key).verify(
        lora_expert.root, signed.bundle
    )
    bundle = json.loads(signed.bundle.read_text())
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == law_key.fingerprint.removeprefix("sha256:")
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    assert "model.sig" in statement["predicate"]["serialization"]["ignore_paths"]


def test_library_verifier_refuses_a_mose_bundle_after_tampering(lora_expert, law_key):
    signed = oms.sign_folder(lora_expert.root, None, law_key.private_key)
    (lora_expert.root / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter_config.json"):
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=law_key.public_key).verify(
            lora_expert.root, signed.bundle
        )


def test_bundle_the_library_writes_verifies_in_mose(lora_expert, law_key):
    bundle = _library_sign(lora_expert.root, law_key.private_key)
    verified = oms.verify_folder(lora_expert.root, bundle, {"other-team": "not a key", **_keys(law_key)})
    assert (verified.key, verified.fingerprint) == ("law-team", law_key.fingerprint)
    assert oms.check_covers_expert(verified, lora_expert.root, load_manifest(lora_expert.manifest_path)) == (
        "manifest.yaml"
    )


def test_bundle_outside_the_folder(lora_expert, law_key, tmp_path):
    signed = oms.sign_folder(lora_expert.root, tmp_path / "demo-law.sig", law_key.private_key)
    assert "model.sig" not in signed.files and len(signed.files) == 3
    assert oms.verify_folder(lora_expert.root, tmp_path / "demo-law.sig", _keys(law_key)).key == "law-team"


# ------------------------------------------------------------------------------------ refusals
def test_tampered_file_is_named(lora_expert, law_key):
    signed = oms.sign_folder(lora_expert.root, None, law_key.private_key)
    weights = lora_expert.root / "adapter_model.safetensors"
    before = sha256_of(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, _keys(law_key))) == (
        "the OMS bundle model.sig does not match the expert's files: adapter_model.safetensors: sha256 "
        f"{sha256_of(weights)[:12]} on disk, {before[:12]} signed (changed after signing)"
    )


def test_unsigned_extra_file_is_named(lora_expert, law_key):
    signed = oms.sign_folder(lora_expert.root, None, law_key.private_key)
    (lora_expert.root / "sub").mkdir()
    (lora_expert.root / "sub" / "notes.txt").write_text("added after signing")
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, _keys(law_key))) == (
        "the OMS bundle model.sig does not match the expert's files: sub/notes.txt: not covered by the bundle "
        "(an unsigned file)"
    )


def test_missing_signed_file_is_named(lora_expert, law_key):
    signed = oms.sign_folder(lora_expert.root, None, law_key.private_key)
    (lora_expert.root / "adapter_config.json").unlink()
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, _keys(law_key))) == (
        "the OMS bundle model.sig does not match the expert's files: adapter_config.json: signed but missing "
        "from the folder"
    )


def test_bundle_for_other_files_says_so_and_names_them(lora_expert, law_key, tmp_path):
    other = build_lora_expert(tmp_path / "other-law", name="other-law", rank=4, seed=7)
    oms.sign_folder(other.root, None, law_key.private_key)
    shutil.copy(other.root / "model.sig", lora_expert.root / "model.sig")
    message = _refusal(lambda: oms.verify_folder(lora_expert.root, lora_expert.root / "model.sig", _keys(law_key)))
    assert message.startswith(
        "the OMS bundle model.sig was signed for other files (none of its 3 files is in "
        "this folder): adapter_config.json: sha256 "
    )
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.yaml"):
        assert (
            f"{name}: sha256 {sha256_of(lora_expert.root / name)[:12]} on disk, "
            f"{sha256_of(other.root / name)[:12]} signed" in message
        )


def test_bundle_that_does_not_ignore_itself_is_named(lora_expert, law_key):
    bundle = lora_expert.root / "model.sig"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=law_key.private_key).sign(
        lora_expert.root, bundle
    )
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, bundle, _keys(law_key))) == (
        "the OMS bundle model.sig does not match the expert's files: model.sig: the bundle itself is not in its "
        "ignore_paths (sign with its path ignored)"
    )


def test_key_of_another_team_is_refused(lora_expert, law_key, mose_home):
    rogue = oms.generate_keypair("rogue-team", mose_home.keys_dir)
    signed = oms.sign_folder(lora_expert.root, None, rogue.private_key)
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, _keys(law_key))) == (
        f"the OMS bundle model.sig was signed with key {rogue.fingerprint[:19]}, which is none of the allowed keys "
        f"(law-team {law_key.fingerprint[:19]})"
    )


def test_forged_key_hint_or_changed_statement_fails_the_signature(lora_expert, law_key, mose_home):
    rogue = oms.generate_keypair("rogue-team", mose_home.keys_dir)
    signed = oms.sign_folder(lora_expert.root, None, rogue.private_key)
    bundle = json.loads(signed.bundle.read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = law_key.fingerprint.removeprefix("sha256:")
    signed.bundle.write_text(json.dumps(bundle))
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, _keys(law_key))) == (
        "the signature of the OMS bundle model.sig does not verify with key law-team (the bundle was changed after "
        "signing, or signed with another key)"
    )


def test_no_p256_key_and_not_a_bundle(lora_expert, law_key, mose_home):
    signed = oms.sign_folder(lora_expert.root, None, law_key.private_key)
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, {"law-team": ed.public_key_b64})) == (
        "no ECDSA P-256 key to check the OMS bundle model.sig with (allowed keys: law-team); OMS bundles need a "
        "P-256 key (`mose keys generate TEAM --type p256`)"
    )
    signed.bundle.write_text("{}")
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, signed.bundle, _keys(law_key))) == (
        "model.sig is not an OMS bundle (expected a Sigstore bundle with a DSSE envelope listing the model's files)"
    )
    assert _refusal(lambda: oms.sign_folder(lora_expert.root, None, ed.private_key)).endswith(
        "law-team.key: not an ECDSA P-256 key (OMS bundles are signed with P-256; make one with "
        "`mose keys generate TEAM --type p256`)"
    )


# ----------------------------------------------------------------------------------- registry
@pytest.fixture
def strict(mose_home, seeded_registry, law_key):
    """A registry (same home) that requires signatures and trusts law-team's P-256 key."""
    settings = RegistrySettings(require_signatures=True, trusted_keys={"law-team": law_key.public_key.read_text()})
    reg = Registry.open(mose_home, settings=settings)
    yield reg
    reg.close()


@pytest.fixture
def team_expert(tmp_path):
    """demo-law@1.0.0 owned by law-team."""
    return build_lora_expert(tmp_path / "demo-law", owner="law-team")


def test_registry_verifies_the_bundle_and_records_the_key(strict, team_expert, law_key):
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    record = strict.add(team_expert.manifest_path)
    assert record.manifest.signature is None  # an OMS bundle satisfies require_signatures on its own
    details = strict.audit_entries()[-1].details
    assert details["signature"] == "unsigned"
    assert details["oms"] == {
        "format": "oms-v1",
        "status": "verified",
        "key": "law-team",
        "fingerprint": law_key.fingerprint,
        "bundle": "model.sig",
        "files": 3,
    }
    assert strict.provenance("demo-law", "1.0.0") == {"signature": "unsigned", "oms": details["oms"]}
    assert strict.audit_verify().ok


def test_ed25519_signature_beside_a_bundle_the_registry_cannot_check(strict, team_expert, law_key, mose_home):
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    signed = sign_manifest(load_manifest(team_expert.manifest_path), load_ed25519_key(ed.private_key), "law-team")
    dump_manifest(signed, team_expert.manifest_path)  # ed25519 first: it rewrites the manifest
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    settings = strict.settings.model_copy(update={"trusted_keys": {"law-team": ed.public_key_b64}})
    with Registry.open(strict.home, settings=settings) as ed_only:  # the team's only trusted key is ed25519
        ed_only.add(team_expert.manifest_path)
        assert ed_only.provenance("demo-law", "1.0.0") == {
            "signature": "verified",
            "oms": {"format": "oms-v1", "status": "untrusted-team", "bundle": "model.sig"},
        }


def test_registry_refuses_a_tampered_file_and_stays_unchanged(strict, team_expert, law_key):
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    config = team_expert.root / "adapter_config.json"
    before = sha256_of(config)
    config.write_text(config.read_text().replace('"r": 8', '"r": 9'))
    assert_refused(
        strict,
        lambda: strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the OMS bundle model.sig does not match the expert's files: adapter_config.json: sha256 "
        f"{sha256_of(config)[:12]} on disk, {before[:12]} signed (changed after signing)",
    )


def test_registry_refuses_an_unsigned_extra_file(strict, team_expert, law_key):
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    (team_expert.root / "README.md").write_text("added later")
    assert_refused(
        strict,
        lambda: strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the OMS bundle model.sig does not match the expert's files: README.md: not covered by "
        "the bundle (an unsigned file)",
    )


def test_registry_refuses_a_bundle_for_other_files(strict, team_expert, law_key, tmp_path):
    other = build_lora_expert(tmp_path / "other", name="other-law", rank=4, seed=5, owner="law-team")
    oms.sign_folder(other.root, tmp_path / "other.sig", law_key.private_key)
    message = _refusal(lambda: strict.add(team_expert.manifest_path, bundle=tmp_path / "other.sig"))
    assert message.startswith(
        "demo-law@1.0.0: the OMS bundle other.sig was signed for other files (none of its 3 "
        "files is in this folder): adapter_config.json: sha256 "
    )
    assert [r.ref for r in strict.list()] == ["seed-law@1.0.0"]


def test_registry_refuses_a_manifest_changed_after_signing(strict, team_expert, law_key):
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    before = sha256_of(team_expert.manifest_path)
    text = team_expert.manifest_path.read_text().replace("(test expert)", "(and medicine too)")
    team_expert.manifest_path.write_text(text)
    assert_refused(
        strict,
        lambda: strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the OMS bundle model.sig does not match the expert's files: manifest.yaml: sha256 "
        f"{sha256_of(team_expert.manifest_path)[:12]} on disk, {before[:12]} signed (changed after signing)",
    )


def test_registry_refuses_a_bundle_that_leaves_out_an_expert_file(strict, team_expert, law_key):
    _library_sign(team_expert.root, law_key.private_key, ignore=["adapter_config.json"])
    assert_refused(
        strict,
        lambda: strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: adapter_config.json: listed in the manifest but not covered by the OMS bundle model.sig",
    )


def test_registry_refuses_a_bundle_without_the_manifest(strict, team_expert, law_key, tmp_path):
    _library_sign(team_expert.root, law_key.private_key, ignore=["manifest.yaml"])
    assert_refused(
        strict,
        lambda: strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the OMS bundle model.sig covers no manifest (manifest.yaml, manifest.yml, manifest.json "
        "at the top of the folder); put the manifest in the expert folder and sign the folder again",
    )


def test_registry_refuses_a_bundle_whose_owner_has_no_key(strict, law_key, tmp_path):
    expert = build_lora_expert(tmp_path / "demo-law")  # owner: test-team
    oms.sign_folder(expert.root, None, law_key.private_key)
    assert_refused(
        strict,
        lambda: strict.add(expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: comes with an OMS bundle (model.sig) but its owner 'test-team' has no trusted key in "
        "this registry (trusted teams: law-team); ask the operator to add the team's P-256 public key to "
        "trusted_keys in registry.yaml",
    )


def test_unverifiable_bundle_is_recorded_when_signatures_are_optional(registry, lora_expert, law_key):
    oms.sign_folder(lora_expert.root, None, law_key.private_key)
    registry.add(lora_expert.manifest_path)
    assert registry.audit_entries()[-1].details["oms"] == {
        "format": "oms-v1",
        "status": "untrusted-team",
        "bundle": "model.sig",
    }


def test_folder_without_bundle_is_unchanged_behaviour(registry, lora_expert):
    registry.add(lora_expert.manifest_path)
    assert "oms" not in registry.audit_entries()[-1].details
    assert registry.provenance("demo-law", "1.0.0") == {"signature": "unsigned"}


def test_bundle_hashed_otherwise_than_by_file_sha256_is_refused(lora_expert, law_key):
    bundle = lora_expert.root / "model.sig"
    hashing = (
        model_signing.hashing.Config()
        .use_file_serialization(hashing_algorithm="blake2")
        .set_ignored_paths(paths=["model.sig"])
    )
    model_signing.signing.Config().set_hashing_config(hashing).use_elliptic_key_signer(
        private_key=law_key.private_key
    ).sign(lora_expert.root, bundle)
    assert _refusal(lambda: oms.verify_folder(lora_expert.root, bundle, _keys(law_key))) == (
        "the OMS bundle model.sig hashes the model as files/blake2b; mose takes bundles that list whole files with "
        "their sha256 (the library's default)"
    )


def test_manifest_object_with_a_signed_copy_in_the_folder(strict, team_expert, law_key):
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    manifest = load_manifest(team_expert.manifest_path)
    assert strict.add(manifest, files_dir=team_expert.root).ref == "demo-law@1.0.0"
    assert strict.provenance("demo-law", "1.0.0")["oms"]["status"] == "verified"


def test_p256_trusted_key_and_an_ed25519_signature(strict, team_expert, law_key, mose_home):
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    signed = sign_manifest(load_manifest(team_expert.manifest_path), load_ed25519_key(ed.private_key), "law-team")
    dump_manifest(signed, team_expert.manifest_path)
    assert_refused(  # without a bundle the ed25519 signature has no key to check it with
        strict,
        lambda: strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: signed by team 'law-team', whose trusted key is an ECDSA P-256 key: it checks the team's "
        "OMS bundles, not ed25519 signatures; sign the expert folder with `mose expert sign MANIFEST --format oms`",
    )
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    strict.add(team_expert.manifest_path)  # the bundle is the signature; the ed25519 one is recorded unchecked
    assert strict.provenance("demo-law", "1.0.0")["signature"] == "untrusted-team"
    assert strict.provenance("demo-law", "1.0.0")["oms"]["status"] == "verified"


def test_registered_team_with_both_key_types(strict, team_expert, law_key, mose_home):
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    strict.create_team("law-team", [ed.public_key_b64])  # ed25519 registered; P-256 in trusted_keys
    signed = sign_manifest(load_manifest(team_expert.manifest_path), load_ed25519_key(ed.private_key), "law-team")
    dump_manifest(signed, team_expert.manifest_path)  # ed25519 first: it rewrites the manifest
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    strict.add(team_expert.manifest_path)
    provenance = strict.provenance("demo-law", "1.0.0")
    assert provenance["signature"] == "verified"
    assert (provenance["oms"]["status"], provenance["oms"]["key"]) == ("verified", "law-team#2")


# --------------------------------------------------------------------- teams with P-256 keys
def _p256_pem(pair: oms.P256KeyPair) -> str:
    return pair.public_key.read_text()


@pytest.fixture
def rogue_key(tmp_path) -> oms.P256KeyPair:
    return oms.generate_keypair("rogue-team", tmp_path / "rogue-keys")


@pytest.fixture
def team_strict(mose_home, seeded_registry):
    """A registry that requires signatures and trusts no key in registry.yaml: only keys registered
    with the teams can verify anything."""
    reg = Registry.open(mose_home, settings=RegistrySettings(require_signatures=True))
    yield reg
    reg.close()


def test_a_team_registers_p256_keys_as_pem_beside_ed25519_keys(registry, law_key, mose_home):
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    pem = _p256_pem(law_key)
    team, _ = registry.create_team("law-team", ["\n  " + pem.replace("\n", "\r\n") + "\n\n", ed.public_key_b64])
    assert team.public_keys == [pem, ed.public_key_b64]  # P-256 kept as canonical PEM, ed25519 as base64
    assert registry.add_team_key("law-team", pem).public_keys == [pem, ed.public_key_b64]  # already there
    assert registry.remove_team_key("law-team", pem.strip()).public_keys == [ed.public_key_b64]
    assert registry.add_team_key("law-team", str(pem)).public_keys == [ed.public_key_b64, pem]
    assert registry.team_keys() == {"law-team": [ed.public_key_b64, pem]}
    assert [(e.action, e.details) for e in registry.audit_entries()] == [
        ("team-create", {"public_keys": [pem, ed.public_key_b64]}),
        ("team-remove-key", {"public_key": pem}),
        ("team-add-key", {"public_key": pem}),
    ]


def test_keys_of_other_kinds_are_refused_naming_the_team(registry):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    message = (
        "public key of team 'law-team' is neither an ed25519 key (TEAM.pub from `mose keys generate`, or "
        "base64 of its 32 bytes) nor an ECDSA P-256 key (TEAM.p256.pub from `mose keys generate --type p256`)"
    )
    for text in (p384, "not a key", base64.b64encode(b"x" * 31).decode()):
        with pytest.raises(SignatureError) as caught:
            registry.create_team("law-team", [text])
        assert str(caught.value) == message
    assert registry.teams() == []


def test_a_bundle_verifies_with_the_owning_teams_registered_p256_key(team_strict, team_expert, law_key):
    team_strict.create_team("law-team", [_p256_pem(law_key)])
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    record = team_strict.add(team_expert.manifest_path, actor=Principal.of_team("law-team"))
    assert record.manifest.signature is None  # the bundle alone meets require_signatures
    assert team_strict.provenance("demo-law", "1.0.0") == {
        "signature": "unsigned",
        "oms": {
            "format": "oms-v1",
            "status": "verified",
            "key": "law-team",
            "fingerprint": law_key.fingerprint,
            "bundle": "model.sig",
            "files": 3,
        },
    }
    assert team_strict.audit_entries()[-1].actor == "team:law-team"
    assert team_strict.audit_verify().ok


@pytest.mark.parametrize("law_has", ["p256", "ed25519", "nothing"])
@pytest.mark.parametrize("rogue_key_in", ["team", "trusted_keys"])
def test_a_bundle_signed_by_another_teams_key_is_refused_naming_both(
    mose_home, seeded_registry, team_expert, law_key, rogue_key, law_has, rogue_key_in, tmp_path
):
    trusted = {"rogue-team": _p256_pem(rogue_key)} if rogue_key_in == "trusted_keys" else {}
    with Registry.open(mose_home, settings=RegistrySettings(require_signatures=True, trusted_keys=trusted)) as reg:
        own = {
            "p256": [_p256_pem(law_key)],
            "nothing": [],
            "ed25519": [generate_ed25519_keypair("law-team", tmp_path / "ed").public_key_b64],
        }[law_has]
        reg.create_team("law-team", own)
        reg.create_team("rogue-team", [_p256_pem(rogue_key)] if rogue_key_in == "team" else [])
        oms.sign_folder(team_expert.root, None, rogue_key.private_key)
        assert_refused(
            reg,
            lambda: reg.add(team_expert.manifest_path, actor=Principal.of_team("law-team")),
            SignatureError,
            "demo-law@1.0.0: the OMS bundle model.sig has a valid signature made with a key of team 'rogue-team', "
            "and demo-law@1.0.0 is owned by team 'law-team'; only a key registered to team 'law-team' may sign its "
            "experts",
        )


def test_another_teams_bundle_is_refused_even_when_signatures_are_optional(registry, team_expert, law_key, rogue_key):
    registry.create_team("law-team")
    registry.create_team("rogue-team", [_p256_pem(rogue_key)])
    oms.sign_folder(team_expert.root, None, rogue_key.private_key)
    with pytest.raises(
        SignatureError, match="made with a key of team 'rogue-team', and demo-law@1.0.0 is owned by team 'law-team'"
    ):
        registry.add(team_expert.manifest_path)
    assert registry.list() == []


def test_a_tampered_file_is_named_even_when_another_team_holds_the_same_key(team_strict, team_expert, law_key):
    team_strict.create_team("law-team", [_p256_pem(law_key)])
    team_strict.create_team("sister-team", [_p256_pem(law_key)])
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    (team_expert.root / "README.md").write_text("added later")
    assert_refused(
        team_strict,
        lambda: team_strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: the OMS bundle model.sig does not match the expert's files: README.md: not covered by "
        "the bundle (an unsigned file)",
    )


def test_a_bundle_no_team_key_made(team_strict, team_expert, law_key, rogue_key, mose_home):
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    team_strict.create_team("law-team", [ed.public_key_b64])
    oms.sign_folder(team_expert.root, None, rogue_key.private_key)  # a key no team registered
    assert_refused(
        team_strict,
        lambda: team_strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: comes with an OMS bundle (model.sig) but its owner, team 'law-team', has no ECDSA P-256 "
        "key registered to check it with; ask the operator to add one (`mose team add-key law-team --key "
        "law-team.p256.pub`)",
    )
    team_strict.add_team_key("law-team", _p256_pem(law_key))
    assert_refused(
        team_strict,
        lambda: team_strict.add(team_expert.manifest_path),
        SignatureError,
        f"demo-law@1.0.0: the OMS bundle model.sig was signed with key {rogue_key.fingerprint[:19]}, which is none "
        f"of the allowed keys (law-team#2 {law_key.fingerprint[:19]})",
    )


def test_removing_a_teams_p256_key_stops_its_bundles(team_strict, team_expert, law_key, tmp_path):
    team_strict.create_team("law-team", [_p256_pem(law_key)])
    oms.sign_folder(team_expert.root, None, law_key.private_key)
    team_strict.remove_team_key("law-team", _p256_pem(law_key))
    with pytest.raises(SignatureError, match="has no ECDSA P-256 key registered to check it with"):
        team_strict.add(team_expert.manifest_path)
    team_strict.add_team_key("law-team", str(law_key.public_key.read_text()))
    assert team_strict.add(team_expert.manifest_path).ref == "demo-law@1.0.0"


def test_an_ed25519_signature_on_an_expert_of_a_team_with_only_p256_keys(team_strict, team_expert, law_key, mose_home):
    team_strict.create_team("law-team", [_p256_pem(law_key)])
    ed = generate_ed25519_keypair("law-team", mose_home.keys_dir)
    signed = sign_manifest(load_manifest(team_expert.manifest_path), load_ed25519_key(ed.private_key), "law-team")
    dump_manifest(signed, team_expert.manifest_path)
    assert_refused(
        team_strict,
        lambda: team_strict.add(team_expert.manifest_path),
        SignatureError,
        "demo-law@1.0.0: owned by team 'law-team', whose keys are all ECDSA P-256 keys: they check the team's OMS "
        "bundles, not ed25519 signatures; sign the expert folder with `mose expert sign MANIFEST --format oms`, or "
        "ask the operator to add the team's ed25519 key (`mose team add-key law-team --key law-team.pub`)",
    )
    unsigned = build_lora_expert(team_expert.root.parent / "unsigned", name="unsigned-law", owner="law-team")
    with pytest.raises(SignatureError) as caught:
        team_strict.add(unsigned.manifest_path)
    assert str(caught.value).endswith(
        "sign it with a key of team 'law-team', its owner (`mose expert sign MANIFEST --key law-team.key`), or sign "
        "the expert folder with its P-256 key (`mose expert sign MANIFEST --format oms --key law-team.p256.key`)"
    )
    oms.sign_folder(team_expert.root, None, law_key.private_key)  # the bundle is the signature
    team_strict.add(team_expert.manifest_path)
    assert team_strict.provenance("demo-law", "1.0.0")["oms"]["status"] == "verified"


def test_an_explicit_bundle_that_is_missing_is_refused(registry, lora_expert, tmp_path):
    assert_refused(
        registry,
        lambda: registry.add(lora_expert.manifest_path, bundle=tmp_path / "nope.sig"),
        SignatureError,
        f"demo-law@1.0.0: OMS bundle {tmp_path / 'nope.sig'} not found",
    )


def test_cli_team_p256_key_and_expert_add(mose_home, team_expert, law_key, rogue_key, capsys):
    from serve.cli import main

    RegistrySettings(require_signatures=True).save(mose_home)
    home = ["--home", str(mose_home.root)]

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, *home])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("team", "create", "law-team", "--key", str(law_key.public_key))[0] == 0
    assert run("team", "create", "rogue-team")[0] == 0
    code, out, _ = run("team", "add-key", "rogue-team", "--key", str(rogue_key.public_key), "--json")
    assert code == 0 and json.loads(out)["public_keys"] == [_p256_pem(rogue_key)]
    code, out, _ = run("team", "list", "--json")
    assert [(t["name"], t["public_keys"]) for t in json.loads(out)] == [
        ("law-team", [_p256_pem(law_key)]),
        ("rogue-team", [_p256_pem(rogue_key)]),
    ]

    oms.sign_folder(team_expert.root, None, rogue_key.private_key)
    code, _, err = run("expert", "add", str(team_expert.root))
    assert code == 2 and err == (
        "error: demo-law@1.0.0: the OMS bundle model.sig has a valid signature made with a key of team "
        "'rogue-team', and demo-law@1.0.0 is owned by team 'law-team'; only a key registered to team 'law-team' "
        "may sign its experts\n"
    )
    code, out, _ = run(
        "expert", "sign", str(team_expert.manifest_path), "--format", "oms", "--key", str(law_key.private_key)
    )
    assert code == 0
    code, out, _ = run("expert", "add", str(team_expert.root))
    assert code == 0 and (f"OMS bundle model.sig verified with the key of law-team ({law_key.fingerprint})" in out)
