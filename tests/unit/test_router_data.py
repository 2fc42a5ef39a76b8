"""Router training data: deterministic held-out split, no leakage, clear errors on bad files."""

from __future__ import annotations

import json

import pytest

from registry.errors import MoseError
from router_model.data import (
    LabelledQuery,
    assemble,
    load_jsonl,
    normalise,
    split_heldout,
    split_validation,
)


def test_heldout_split_is_deterministic_and_disjoint(router_subset):
    rows = load_jsonl(router_subset)
    train_a, held_a = split_heldout(rows, 0.2, "salt")
    train_b, held_b = split_heldout(list(reversed(rows)), 0.2, "salt")
    assert {r.id for r in held_a} == {r.id for r in held_b}
    assert 0.12 < len(held_a) / len(rows) < 0.28
    held_text = {normalise(r.query) for r in held_a}
    assert not any(normalise(r.query) in held_text for r in train_a)


def test_duplicate_text_with_another_id_never_reaches_training():
    held = LabelledQuery(query="What is a tort?", domain="law", id="x")
    rows = [LabelledQuery(query=f"question {i}", domain="law", id=f"q{i}") for i in range(200)]
    # The same question under many ids: whichever copies hash into the held-out part, none may train.
    copies = [LabelledQuery(query="  what is a TORT? ", domain="law", id=f"dup{i}") for i in range(50)]
    train, heldout = split_heldout(rows + copies + [held], 0.2, "salt")
    if any(normalise(r.query) == "what is a tort?" for r in heldout):
        assert not any(normalise(r.query) == "what is a tort?" for r in train)


def test_assemble_keeps_heldout_out_of_train_and_validation(router_subset):
    data = assemble([router_subset], heldout_fraction=0.2, validation_fraction=0.1, salt="s")
    held = {r.id for r in data.heldout}
    assert held and not held & {r.id for r in data.train + data.validation}
    assert not {r.id for r in data.train} & {r.id for r in data.validation}
    assert set(data.files.values()) and all(len(h) == 64 for h in data.files.values())


def test_validation_split_keeps_every_label_trainable():
    rows = [LabelledQuery(query=f"q{i}", domain="big", id=str(i)) for i in range(100)]
    rows.append(LabelledQuery(query="lonely", domain="tiny", id="t"))
    fit, validation = split_validation(rows, 0.99, "s")
    assert "tiny" in {r.domain for r in fit}


def test_bad_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "ok", "domain": "law"}) + "\n" + json.dumps({"text": "no query"}) + "\n")
    with pytest.raises(MoseError, match=r"bad.jsonl:2: not a labelled row .*\"query\" and \"domain\""):
        load_jsonl(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MoseError, match="not found: pass an existing JSONL file with --data"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_one_domain_is_not_enough(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "domain": "law", "id": str(i)}) + "\n" for i in range(20)))
    with pytest.raises(MoseError, match="at least two domains"):
        assemble([path], heldout_fraction=0.2, validation_fraction=0.1, salt="s")
