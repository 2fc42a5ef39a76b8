"""Teams in the registry: tokens kept only as salted hashes, rotation and revocation, team-scoped
writes (a team writes only the experts it owns; the registry is unchanged by a refused write), the
audit log naming the actor and never a token, and signatures checked against the owner's keys."""

from __future__ import annotations

import hashlib
import inspect
import sqlite3

import pytest

from registry import Registry, RegistrySettings
from registry.errors import AccessDeniedError, ConflictError, MoseError, NotFoundError, SignatureError
from registry.manifest import dump_manifest, load_manifest
from registry.signing import generate_keypair, load_private_key, sign_manifest
from registry.teams import SECRET_CHARS, TOKEN_PREFIX, Principal, team_of_token, token_matches
from tests._fixtures.registry import assert_refused, build_lora_expert, registry_state

TEAM_A, TEAM_B = "team-a", "team-b"


@pytest.fixture
def teams(registry, tmp_path):
    """Two teams; team B owns ``b-expert@1.0.0`` (registered by B, activated by the operator)."""
    _, token_a = registry.create_team(TEAM_A)
    _, token_b = registry.create_team(TEAM_B)
    b_expert = build_lora_expert(tmp_path / "b-expert", name="b-expert", owner=TEAM_B, seed=3)
    registry.add(b_expert.manifest_path, actor=Principal.of_team(TEAM_B))
    registry.activate("b-expert")
    return {"a": token_a, "b": token_b, "b_expert": b_expert}


def _every_byte_under(root) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


# ------------------------------------------------------------------------------ tokens


def test_a_token_is_stored_only_as_a_salted_hash(registry, mose_home):
    team, token = registry.create_team(TEAM_A)
    assert team.name == TEAM_A and not team.revoked
    assert token.startswith(f"{TOKEN_PREFIX}{TEAM_A}_")
    assert len(token) == len(TOKEN_PREFIX) + len(TEAM_A) + 1 + SECRET_CHARS
    assert team_of_token(token) == TEAM_A
    secret = token[-SECRET_CHARS:]
    stored = _every_byte_under(mose_home.root)  # the database, its WAL and everything else in the home
    assert token.encode() not in stored and secret.encode() not in stored
    assert hashlib.sha256(token.encode()).hexdigest().encode() not in stored  # not an unsalted hash either
    with sqlite3.connect(mose_home.db_path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(teams)")]
        salt, digest = conn.execute("SELECT token_salt, token_hash FROM teams").fetchone()
    assert columns == ["name", "token_salt", "token_hash", "public_keys_json", "created_at", "rotated_at", "revoked_at"]
    assert token_matches(token, salt, digest) and not token_matches(token + "x", salt, digest)
    _, again = registry.create_team("team-c")
    with sqlite3.connect(mose_home.db_path) as conn:
        salts = {row[0] for row in conn.execute("SELECT token_salt FROM teams")}
    assert len(salts) == 2 and again != token


def test_the_token_comparison_is_constant_time():
    from registry import teams

    source = inspect.getsource(teams.token_matches)
    assert "hmac.compare_digest(" in source and "==" not in source


def test_a_valid_token_authenticates_its_team(registry, teams):
    assert registry.authenticate_team(teams["a"]).name == TEAM_A
    assert registry.authenticate_team(teams["b"]).name == TEAM_B


@pytest.mark.parametrize(
    "case", ["other secret", "one character off", "no such team", "not a team token", "empty", "truncated"]
)
def test_wrong_tokens_are_refused_without_echoing_them(registry, teams, case):
    token = teams["a"]
    wrong = {
        "other secret": f"{TOKEN_PREFIX}{TEAM_A}_" + "A" * SECRET_CHARS,
        "one character off": token[:-1] + ("A" if token[-1] != "A" else "B"),
        "no such team": f"{TOKEN_PREFIX}team-z_" + token[-SECRET_CHARS:],
        "not a team token": "hello",
        "empty": "",
        "truncated": token[:-5],
    }[case]
    with pytest.raises(AccessDeniedError) as caught:
        registry.authenticate_team(wrong)
    message = str(caught.value)
    if case in ("other secret", "one character off"):
        assert message == (
            "the token is not valid for team 'team-a' (a wrong token, or one replaced by "
            "`mose team rotate`); ask the operator for the current one"
        )
    else:
        assert message == (
            "not a valid team token (no such team, or a mistyped token); team tokens come from "
            "`mose team create` or `mose team rotate`"
        )
    assert token[-SECRET_CHARS:] not in message
    assert len(wrong) < 20 or wrong[-20:] not in message


def test_rotation_refuses_the_old_token_and_accepts_the_new(registry, teams):
    team, new = registry.rotate_team_token(TEAM_A)
    assert new != teams["a"] and team.rotated_at is not None
    with pytest.raises(AccessDeniedError, match="not valid for team 'team-a'"):
        registry.authenticate_team(teams["a"])
    assert registry.authenticate_team(new).name == TEAM_A
    assert registry.authenticate_team(teams["b"]).name == TEAM_B  # other teams are untouched


def test_a_revoked_token_is_refused_and_rotation_reinstates_the_team(registry, teams):
    revoked = registry.revoke_team(TEAM_A, reason="laptop lost")
    assert revoked.revoked
    with pytest.raises(AccessDeniedError) as caught:
        registry.authenticate_team(teams["a"])
    assert str(caught.value) == (
        f"the token of team 'team-a' was revoked at {revoked.revoked_at.isoformat()}; ask "
        "the operator for a new one (`mose team rotate team-a`)"
    )
    assert registry.revoke_team(TEAM_A).revoked_at == revoked.revoked_at  # revoking again changes nothing
    team, new = registry.rotate_team_token(TEAM_A)
    assert not team.revoked and registry.authenticate_team(new).name == TEAM_A
    with pytest.raises(AccessDeniedError):
        registry.authenticate_team(teams["a"])


def test_a_revoked_team_may_not_write_even_with_a_principal_made_earlier(registry, teams, tmp_path):
    own = build_lora_expert(tmp_path / "a-expert", name="a-expert", owner=TEAM_A, seed=4)
    registry.revoke_team(TEAM_A)
    assert_refused(
        registry,
        lambda: registry.add(own.manifest_path, actor=Principal.of_team(TEAM_A)),
        AccessDeniedError,
        "team 'team-a' was revoked; it may not change the registry",
    )


def test_team_management_refusals(registry, teams):
    with pytest.raises(
        ConflictError, match="team 'team-a' already exists; give it a new token with `mose team rotate team-a`"
    ):
        registry.create_team(TEAM_A)
    with pytest.raises(MoseError, match="team 'Team A': use a lowercase slug"):
        registry.create_team("Team A")
    with pytest.raises(NotFoundError, match=r"no team 'team-z' \(teams: team-a, team-b\)"):
        registry.rotate_team_token("team-z")
    with pytest.raises(AccessDeniedError, match="creating a team is for the registry operator"):
        registry.create_team("team-c", actor=Principal.of_team(TEAM_A))
    with pytest.raises(AccessDeniedError, match="rotating a team's token is for the registry operator"):
        registry.rotate_team_token(TEAM_B, actor=Principal.of_team(TEAM_A))
    assert [t.name for t in registry.teams()] == [TEAM_A, TEAM_B]


# ------------------------------------------------------------------------- team scope


def test_team_a_cannot_write_team_b_experts_and_nothing_changes(registry, teams, tmp_path):
    a = Principal.of_team(TEAM_A)
    b_manifest = teams["b_expert"].manifest
    new_version = build_lora_expert(tmp_path / "b-2", name="b-expert", version="2.0.0", owner=TEAM_B, seed=5)
    squatted = build_lora_expert(tmp_path / "b-3", name="b-expert", version="3.0.0", owner=TEAM_A, seed=6)
    assert b_manifest["owner"] == TEAM_B
    cases = [
        (
            lambda: registry.add(new_version.manifest_path, actor=a),
            "team 'team-a' may only register experts it owns, and b-expert@2.0.0 names owner 'team-b'; "
            "set `owner: team-a` in the manifest",
        ),
        (
            lambda: registry.add(squatted.manifest_path, actor=a),
            "expert 'b-expert' is owned by team 'team-b' (the owner of its registered versions); team 'team-a' "
            "may not publish versions of it: choose another name",
        ),
        (
            lambda: registry.retire("b-expert", actor=a),
            "b-expert@1.0.0 is owned by 'team-b'; team 'team-a' may only change the experts it owns",
        ),
        (
            lambda: registry.retire("b-expert", "1.0.0", actor=a),
            "b-expert@1.0.0 is owned by 'team-b'; team 'team-a' may only change the experts it owns",
        ),
        (
            lambda: registry.quarantine("b-expert", None, "sabotage", actor=a),
            "quarantining an expert is for the registry operator; team 'team-a' may register, update and retire "
            "the experts it owns (ask the operator about 'b-expert')",
        ),
        (
            lambda: registry.activate("b-expert", actor=a),
            "activating an expert is for the registry operator; team 'team-a' may register, update and retire the "
            "experts it owns (ask the operator about 'b-expert')",
        ),
        (
            lambda: registry.remove("b-expert", "1.0.0", actor=a),
            "removing an expert's record is for the registry operator; team 'team-a' may register, update and "
            "retire the experts it owns (ask the operator about 'b-expert')",
        ),
        (
            lambda: registry.add_team_key(TEAM_B, generate_keypair("rogue", tmp_path / "k").public_key_b64, actor=a),
            "changing a team's keys is for the registry operator; team 'team-a' may register, update and retire the "
            "experts it owns (ask the operator about 'team-b')",
        ),
        (
            lambda: registry.revoke_team(TEAM_B, actor=a),
            "revoking a team's token is for the registry operator; team 'team-a' may register, update and retire "
            "the experts it owns (ask the operator about 'team-b')",
        ),
    ]
    for call, message in cases:
        assert_refused(registry, call, AccessDeniedError, message)
    assert registry.get("b-expert").status == "active"
    assert [r.ref for r in registry.list()] == ["b-expert@1.0.0"]
    assert registry.team(TEAM_B).public_keys == []


def test_a_team_registers_updates_and_retires_its_own_experts(registry, teams, tmp_path):
    a = Principal.of_team(TEAM_A)
    v1 = build_lora_expert(tmp_path / "a1", name="a-expert", owner=TEAM_A, seed=7)
    v2 = build_lora_expert(tmp_path / "a2", name="a-expert", version="1.1.0", owner=TEAM_A, seed=8)
    assert registry.add(v1.manifest_path, actor=a).status == "pending"
    registry.activate("a-expert")  # the operator
    assert registry.add(v2.manifest_path, actor=a).status == "pending"  # an update: a new version
    assert registry.retire("a-expert", "1.0.0", actor=a).status == "retired"
    assert registry.retire("a-expert", "1.1.0", actor=a).status == "retired"
    entries = [(e.actor, e.action, e.subject) for e in registry.audit_entries() if e.subject.startswith("a-expert")]
    assert entries == [
        ("team:team-a", "register", "a-expert@1.0.0"),
        ("cli", "activate", "a-expert@1.0.0"),
        ("team:team-a", "register", "a-expert@1.1.0"),
        ("team:team-a", "retire", "a-expert@1.0.0"),
        ("team:team-a", "retire", "a-expert@1.1.0"),
    ]
    assert registry.audit_verify().ok


def test_the_audit_log_names_actors_and_never_holds_a_token(registry, teams, mose_home):
    _, rotated = registry.rotate_team_token(TEAM_A)
    registry.revoke_team(TEAM_B)
    entries = registry.audit_entries()
    assert [(e.actor, e.action, e.subject) for e in entries] == [
        ("operator", "team-create", TEAM_A),
        ("operator", "team-create", TEAM_B),
        ("team:team-b", "register", "b-expert@1.0.0"),
        ("cli", "activate", "b-expert@1.0.0"),
        ("operator", "team-rotate", TEAM_A),
        ("operator", "team-revoke", TEAM_B),
    ]
    dumped = "\n".join(e.model_dump_json() for e in entries)
    stored = _every_byte_under(mose_home.root)
    for token in (teams["a"], teams["b"], rotated):
        assert token[-SECRET_CHARS:] not in dumped
        assert token[-SECRET_CHARS:].encode() not in stored


# ------------------------------------------------------------------------- signatures


@pytest.fixture
def keys(tmp_path):
    return {team: generate_keypair(team, tmp_path / "keys") for team in (TEAM_A, TEAM_B)}


def _strict(mose_home, **settings) -> Registry:
    return Registry.open(mose_home, settings=RegistrySettings(require_signatures=True, **settings))


def _signed(tmp_path, name: str, owner: str, key_path, team: str, seed: int):
    expert = build_lora_expert(tmp_path / name, name=name, owner=owner, seed=seed)
    dump_manifest(
        sign_manifest(load_manifest(expert.manifest_path), load_private_key(key_path), team), expert.manifest_path
    )
    return expert


def test_a_signature_must_come_from_a_key_of_the_owning_team(mose_home, tmp_path, keys):
    with _strict(mose_home) as reg:
        reg.create_team(TEAM_A, [keys[TEAM_A].public_key_b64])
        reg.create_team(TEAM_B, [keys[TEAM_B].public_key_b64])
        good = _signed(tmp_path, "a-good", TEAM_A, keys[TEAM_A].private_key, TEAM_A, 1)
        record = reg.add(good.manifest_path, actor=Principal.of_team(TEAM_A))
        assert reg.audit_entries()[-1].details["signature"] == "verified" and record.manifest.signature.team == TEAM_A
        # Team B's valid signature on an expert owned by team A, whether it says team-b or team-a:
        for claimed in (TEAM_B, TEAM_A):
            other = _signed(tmp_path, f"a-by-b-{claimed}", TEAM_A, keys[TEAM_B].private_key, claimed, 2)
            ref = other.ref
            assert_refused(
                reg,
                lambda other=other: reg.add(other.manifest_path),
                SignatureError,
                f"{ref}: the signature is valid but was made with a key of team 'team-b', and {ref} is owned by "
                "team 'team-a'; only a key registered to team 'team-a' may sign its experts",
            )
        unsigned = build_lora_expert(tmp_path / "a-unsigned", name="a-unsigned", owner=TEAM_A, seed=3)
        assert_refused(
            reg,
            lambda: reg.add(unsigned.manifest_path),
            SignatureError,
            "a-unsigned@1.0.0: this registry requires signed manifests and this one has no signature; sign it "
            "with a key of team 'team-a', its owner (`mose expert sign MANIFEST --key team-a.key`)",
        )
        rogue = generate_keypair("rogue", tmp_path / "rogue")
        forged = _signed(tmp_path, "a-forged", TEAM_A, rogue.private_key, TEAM_A, 4)
        assert_refused(
            reg,
            lambda: reg.add(forged.manifest_path),
            SignatureError,
            "a-forged@1.0.0: the signature (team 'team-a') does not verify against any key of team 'team-a', its "
            "owner (it was changed after signing, or signed with another key); sign it again with the team's key",
        )


def test_the_teams_keys_can_change_and_trusted_keys_still_count(mose_home, tmp_path, keys):
    with _strict(mose_home, trusted_keys={TEAM_A: keys[TEAM_A].public_key_b64}) as reg:
        reg.create_team(TEAM_A)  # no key of its own yet: its trusted_keys entry signs
        signed = _signed(tmp_path, "a-one", TEAM_A, keys[TEAM_A].private_key, TEAM_A, 1)
        assert reg.add(signed.manifest_path).status == "pending"
    with _strict(mose_home) as reg:  # without the registry.yaml key, the team needs a registered one
        later = _signed(tmp_path, "a-two", TEAM_A, keys[TEAM_A].private_key, TEAM_A, 2)
        assert_refused(
            reg,
            lambda: reg.add(later.manifest_path),
            SignatureError,
            "a-two@1.0.0: owned by team 'team-a', which has no public key registered, so its signature cannot be "
            "checked; ask the operator to add one (`mose team add-key team-a --key team-a.pub`)",
        )
        assert reg.add_team_key(TEAM_A, keys[TEAM_A].public_key.read_text()).public_keys == [
            keys[TEAM_A].public_key_b64
        ]
        assert reg.add(later.manifest_path).status == "pending"
        reg.remove_team_key(TEAM_A, keys[TEAM_A].public_key_b64)
        third = _signed(tmp_path, "a-three", TEAM_A, keys[TEAM_A].private_key, TEAM_A, 3)
        with pytest.raises(SignatureError, match="has no public key registered"):
            reg.add(third.manifest_path)
        actions = [e.action for e in reg.audit_entries() if e.subject == TEAM_A]
        assert actions == ["team-create", "team-add-key", "team-remove-key"]


def test_owners_without_a_team_keep_the_trusted_keys_rule(mose_home, tmp_path, keys):
    """A deployment without teams: trusted_keys alone decides, as before."""
    with _strict(mose_home, trusted_keys={TEAM_B: keys[TEAM_B].public_key_b64}) as reg:
        expert = _signed(tmp_path, "no-team", "some-group", keys[TEAM_B].private_key, TEAM_B, 1)
        assert reg.add(expert.manifest_path).status == "pending"


def test_a_store_made_before_teams_gets_the_table(mose_home):
    from registry.store import SCHEMA_VERSION

    with Registry.open(mose_home):
        pass
    with sqlite3.connect(mose_home.db_path) as conn:
        conn.execute("DROP TABLE teams")
        conn.execute("PRAGMA user_version = 2")
    with Registry.open(mose_home) as reg:
        reg.create_team(TEAM_A)
        assert [t.name for t in reg.teams()] == [TEAM_A]
    with sqlite3.connect(mose_home.db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_registry_state_helper_sees_teams_unchanged(registry, teams):
    """A refused team action leaves teams as they were too."""
    before = (registry_state(registry), [t.model_dump() for t in registry.teams()])
    with pytest.raises(AccessDeniedError):
        registry.rotate_team_token(TEAM_B, actor=Principal.of_team(TEAM_A))
    assert (registry_state(registry), [t.model_dump() for t in registry.teams()]) == before
    assert registry.authenticate_team(teams["b"]).name == TEAM_B


# -------------------------------------------------------------------------------- CLI


def test_the_team_commands_show_a_token_once_and_never_list_it(mose_home, tmp_path, capsys):
    import json

    from serve.cli import main

    pair = generate_keypair(TEAM_A, tmp_path / "keys")
    home = ["--home", str(mose_home.root)]

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, *home])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("team", "create", TEAM_A, "--key", str(pair.public_key))
    token = out.strip().splitlines()[-1]
    assert code == 0 and "shown once and stored only as a hash" in out and team_of_token(token) == TEAM_A
    code, out, _ = run("team", "list", "--json")
    assert code == 0 and token[-SECRET_CHARS:] not in out
    assert [(t["name"], t["public_keys"], t["revoked_at"]) for t in json.loads(out)] == [
        (TEAM_A, [pair.public_key_b64], None)
    ]
    code, out, _ = run("team", "rotate", TEAM_A, "--json")
    rotated = json.loads(out)["token"]
    with Registry.open(mose_home) as reg:
        assert reg.authenticate_team(rotated).name == TEAM_A
        with pytest.raises(AccessDeniedError):
            reg.authenticate_team(token)
    assert run("team", "revoke", TEAM_A)[0] == 0
    code, out, _ = run("team", "list")
    assert code == 0 and out.splitlines()[1].split()[:3] == [TEAM_A, "1", "revoked"]
    code, _, err = run("team", "create", TEAM_A)
    assert (code, err) == (
        2,
        "error: team 'team-a' already exists; give it a new token with `mose team rotate team-a`\n",
    )
    code, out, _ = run("audit", "log", "--json")
    assert [(e["actor"], e["action"]) for e in json.loads(out)] == [
        ("operator", "team-create"),
        ("operator", "team-rotate"),
        ("operator", "team-revoke"),
    ]
    for secret in (token[-SECRET_CHARS:], rotated[-SECRET_CHARS:]):
        assert secret not in out
