"""The domain taxonomy: defaults, fallback chains, and domains added to a registry."""

from __future__ import annotations

import pytest

from registry import Registry, Taxonomy
from registry.errors import ManifestError

VERTICALS = [
    "code",
    "everyday",
    "finance",
    "general_knowledge",
    "humanities",
    "law",
    "math",
    "medicine",
    "science",
    "social_science",
]


def test_default_verticals_match_the_shared_data():
    taxonomy = Taxonomy.default()
    assert taxonomy.verticals() == VERTICALS
    for vertical in VERTICALS:
        assert taxonomy.parent(vertical) is None
        assert len(taxonomy.children(vertical)) >= 3


def test_parent_and_chain_for_fallback():
    taxonomy = Taxonomy.default()
    assert taxonomy.parent("cardiology") == "medicine"
    assert taxonomy.chain("cardiology") == ["cardiology", "medicine"]
    assert taxonomy.chain("python") == ["python", "code"]
    taxonomy.add("interventional_cardiology", parent="cardiology")
    assert taxonomy.chain("interventional_cardiology") == ["interventional_cardiology", "cardiology", "medicine"]
    assert taxonomy.vertical("interventional_cardiology") == "medicine"
    assert "cardiology" in taxonomy and "astrology" not in taxonomy


def test_unknown_lookups_and_bad_ids_are_refused():
    taxonomy = Taxonomy.default()
    with pytest.raises(ManifestError, match=r"^unknown domain 'astrology'\. Known domains: accounting, algebra, "):
        taxonomy.parent("astrology")
    with pytest.raises(ManifestError, match=r"^parent domain 'nowhere' is unknown\."):
        taxonomy.add("x", parent="nowhere")
    with pytest.raises(ManifestError) as caught:
        taxonomy.add("Tax Law", parent="law")
    assert str(caught.value) == "'Tax Law' is not a domain id: use lowercase letters, digits and _ (e.g. tax_law)"
    with pytest.raises(ManifestError) as caught:
        taxonomy.add("python", parent="science")
    assert str(caught.value) == "domain 'python' already exists under code; a domain has one parent"


def test_added_domains_persist_and_are_audited(mose_home):
    with Registry.open(mose_home) as reg:
        reg.add_domain("maritime_law", parent="law")
        reg.add_domain("gardening")  # a brand-new vertical
        reg.add_domain("gardening")  # same again: no-op
    with Registry.open(mose_home) as reg:
        assert reg.taxonomy.chain("maritime_law") == ["maritime_law", "law"]
        assert "gardening" in reg.taxonomy.verticals()
        assert [(e.action, e.subject, e.details) for e in reg.audit_entries()] == [
            ("add-domain", "maritime_law", {"parent": "law"}),
            ("add-domain", "gardening", {"parent": None}),
        ]
        assert reg.audit_verify().ok


def test_domain_added_by_another_process_is_seen_at_registration(mose_home, tmp_path):
    from tests._fixtures.registry import build_lora_expert

    with Registry.open(mose_home) as first, Registry.open(mose_home) as second:
        _ = first.taxonomy  # cached before the other connection adds a domain
        second.add_domain("space_law", parent="law")
        expert = build_lora_expert(tmp_path / "space", name="space-law", domains=("space_law",))
        assert first.add(expert.manifest_path).domains == ["space_law"]


def test_long_lived_registry_sees_domains_added_elsewhere(mose_home):
    with Registry.open(mose_home) as server, Registry.open(mose_home) as cli:
        assert "tax_law" not in server.taxonomy
        cli.add_domain("tax_law", parent="law")
        assert server.taxonomy.chain("tax_law") == ["tax_law", "law"]
