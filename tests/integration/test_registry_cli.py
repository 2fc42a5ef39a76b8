"""The registry through the real ``mose`` CLI, in subprocesses, on a real data directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

from tests._fixtures.registry import build_lora_expert, run_mose


def test_register_activate_verify_end_to_end(mose_home, tmp_path):
    home = mose_home.root
    expert = build_lora_expert(tmp_path / "demo-law")

    added = run_mose("expert", "add", str(expert.manifest_path), "--json", home=home, check=True)
    assert json.loads(added.stdout)["status"] == "pending"
    again = run_mose("expert", "add", str(expert.manifest_path), home=home, check=True)
    assert again.stdout.strip() == "demo-law@1.0.0 was already registered with these files (pending); nothing to do"

    listed = json.loads(run_mose("expert", "list", "--json", home=home, check=True).stdout)
    assert [(e["name"], e["version"], e["status"], e["domains"]) for e in listed] == [
        ("demo-law", "1.0.0", "pending", ["law"])
    ]
    text = run_mose("expert", "list", home=home, check=True).stdout.splitlines()
    assert text[0].split() == ["NAME", "VERSION", "STATUS", "KIND", "DOMAINS", "OWNER"]
    assert text[1].split() == ["demo-law", "1.0.0", "pending", "lora", "law", "test-team"]

    activated = run_mose("expert", "activate", "demo-law", home=home, check=True)
    assert activated.stdout.splitlines() == [
        "demo-law@1.0.0 is now active",
        "  no router yet: `mose router train` (or `mose up`) trains one that knows every active expert",
    ]

    shown = json.loads(run_mose("expert", "show", "demo-law@1.0.0", "--json", home=home, check=True).stdout)
    assert shown["status"] == "active"
    assert shown["manifest"]["files"] == expert.manifest["files"]
    for rel, blob in shown["blobs"].items():
        assert open(blob, "rb").read() == (expert.root / rel).read_bytes()

    verified = json.loads(run_mose("expert", "verify", "demo-law", "--json", home=home, check=True).stdout)
    assert verified == {"ref": "demo-law@1.0.0", "ok": True, "files": 2, "problems": []}

    audit = run_mose("audit", "verify", home=home, check=True)
    assert audit.stdout.strip() == "audit chain intact (2 entries)"

    schema = json.loads(run_mose("expert", "schema", home=home, check=True).stdout)
    assert schema["title"] == "mose expert manifest"


def test_bad_input_is_exit_2_with_message_and_nothing_stored(mose_home, tmp_path):
    home = mose_home.root
    expert = build_lora_expert(tmp_path / "few", queries=5)
    result = run_mose("expert", "add", str(expert.manifest_path), home=home)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: manifest.yaml: example_queries: at least 20 example queries are needed (got 5)"
    )
    assert json.loads(run_mose("expert", "list", "--json", home=home, check=True).stdout) == []
    assert run_mose("audit", "verify", home=home, check=True).stdout.strip() == "audit chain intact (0 entries)"


def test_signed_registration_with_required_signatures(mose_home, tmp_path):
    home = mose_home.root
    generated = json.loads(run_mose("keys", "generate", "law-team", "--json", home=home, check=True).stdout)
    run_mose("keys", "trust", "law-team", generated["public_key"], "--require", home=home, check=True)

    unsigned = build_lora_expert(tmp_path / "unsigned", name="unsigned-law")
    refused = run_mose("expert", "add", str(unsigned.manifest_path), home=home)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: unsigned-law@1.0.0: this registry requires signed manifests and this one has no signature; "
        "sign it with `mose expert sign MANIFEST --key TEAM.key`"
    )

    signed = build_lora_expert(tmp_path / "signed", name="signed-law")
    run_mose("expert", "sign", str(signed.manifest_path), "--key", generated["private_key"], home=home, check=True)
    accepted = run_mose("expert", "add", str(signed.manifest_path), "--json", home=home, check=True)
    assert json.loads(accepted.stdout)["name"] == "signed-law"

    tampered = signed.manifest_path.read_text().replace("Answers law", "Answers all")
    signed.manifest_path.write_text(tampered.replace("name: signed-law", "name: tampered-law"))
    bad = run_mose("expert", "add", str(signed.manifest_path), home=home)
    assert bad.returncode == 2 and "the signature of team 'law-team' does not match the manifest" in bad.stderr
    listed = json.loads(run_mose("expert", "list", "--json", home=home, check=True).stdout)
    assert [e["name"] for e in listed] == ["signed-law"]


def test_edited_audit_row_is_detected_by_audit_verify(mose_home, tmp_path):
    home = mose_home.root
    expert = build_lora_expert(tmp_path / "demo-law")
    run_mose("expert", "add", str(expert.manifest_path), home=home, check=True)
    run_mose("expert", "activate", "demo-law", home=home, check=True)
    run_mose("expert", "retire", "demo-law", home=home, check=True)
    assert run_mose("audit", "verify", home=home).returncode == 0

    with sqlite3.connect(mose_home.db_path) as conn:
        conn.execute("UPDATE audit_log SET details_json = replace(details_json, 'active', 'pending') WHERE seq = 2")

    result = run_mose("audit", "verify", home=home)
    assert result.returncode == 1
    assert result.stdout.startswith(
        "audit chain BROKEN: audit entry 2 (activate demo-law@1.0.0) was altered: its content no longer matches its hash"
    )
    report = json.loads(run_mose("audit", "verify", "--json", home=home).stdout)
    assert (report["ok"], report["first_bad"]) == (False, 2)


def test_help_texts(mose_home):
    for args in (
        ["expert", "--help"],
        ["expert", "add", "--help"],
        ["keys", "generate", "--help"],
        ["audit", "verify", "--help"],
        ["expert", "sign", "--help"],
    ):
        result = run_mose(*args, home=mose_home.root, check=True)
        assert "usage: mose" in result.stdout
    assert "--files FILES" in run_mose("expert", "add", "--help", home=mose_home.root).stdout
    assert "--type {ed25519,p256}" in run_mose("keys", "generate", "--help", home=mose_home.root).stdout
    assert "--format {ed25519,oms}" in run_mose("expert", "sign", "--help", home=mose_home.root).stdout


def test_oms_round_trip_keys_sign_add(mose_home, tmp_path):
    """`mose keys generate --type p256`, `mose expert sign --format oms`, `mose expert add DIR`, and the
    library's own CLI on both sides: it verifies what mose signs, and mose accepts what it signs."""
    home = mose_home.root
    generated = json.loads(
        run_mose("keys", "generate", "law-team", "--type", "p256", "--json", home=home, check=True).stdout
    )
    assert (generated["type"], generated["private_key"]) == ("p256", str(mose_home.keys_dir / "law-team.p256.key"))
    trusted = json.loads(
        run_mose(
            "keys", "trust", "law-team", generated["public_key"], "--require", "--json", home=home, check=True
        ).stdout
    )
    assert (trusted["type"], trusted["fingerprint"]) == ("p256", generated["fingerprint"])

    expert = build_lora_expert(tmp_path / "demo-law", owner="law-team")
    signed = json.loads(
        run_mose(
            "expert",
            "sign",
            str(expert.manifest_path),
            "--format",
            "oms",
            "--key",
            generated["private_key"],
            "--json",
            home=home,
            check=True,
        ).stdout
    )
    assert signed["bundle"] == str(expert.root / "model.sig")
    assert sorted(signed["files"]) == ["adapter_config.json", "adapter_model.safetensors", "manifest.yaml"]
    library = _model_signing(
        "verify", "key", str(expert.root), "--signature", signed["bundle"], "--public_key", generated["public_key"]
    )
    assert library.returncode == 0 and "Verification succeeded" in library.stdout

    added = run_mose("expert", "add", str(expert.root), home=home, check=True)
    assert added.stdout.splitlines() == [
        "registered demo-law@1.0.0 (pending); activate it with `mose expert activate demo-law@1.0.0`",
        f"  OMS bundle model.sig verified with the key of law-team ({generated['fingerprint']})",
    ]
    shown = json.loads(run_mose("expert", "show", "demo-law", "--json", home=home, check=True).stdout)
    assert shown["provenance"]["oms"]["fingerprint"] == generated["fingerprint"]
    assert (
        f"  OMS bundle: verified with the key of law-team ({generated['fingerprint']})"
        in run_mose("expert", "show", "demo-law", home=home, check=True).stdout.splitlines()
    )

    extra = build_lora_expert(tmp_path / "extra-law", name="extra-law", owner="law-team")
    run_mose(
        "expert",
        "sign",
        str(extra.manifest_path),
        "--format",
        "oms",
        "--key",
        generated["private_key"],
        home=home,
        check=True,
    )
    (extra.root / "notes.json").write_text("{}")
    refused = run_mose("expert", "add", str(extra.root), home=home)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: extra-law@1.0.0: the OMS bundle model.sig does not match the expert's files: notes.json: not "
        "covered by the bundle (an unsigned file)"
    )

    by_library = build_lora_expert(tmp_path / "lib-law", name="lib-law", owner="law-team")
    library = _model_signing(
        "sign",
        "key",
        str(by_library.root),
        "--private_key",
        generated["private_key"],
        "--signature",
        str(by_library.root / "model.sig"),
    )
    assert library.returncode == 0, library.stderr
    run_mose("expert", "add", str(by_library.manifest_path), home=home, check=True)
    listed = json.loads(run_mose("expert", "list", "--json", home=home, check=True).stdout)
    assert sorted(e["name"] for e in listed) == ["demo-law", "lib-law"]
    assert run_mose("audit", "verify", home=home, check=True).stdout.strip() == "audit chain intact (2 entries)"


def _model_signing(*args: str) -> subprocess.CompletedProcess:
    """The model-signing library's own CLI (key-based modes: no network)."""
    return subprocess.run([sys.executable, "-m", "model_signing", *args], capture_output=True, text=True, timeout=120)
