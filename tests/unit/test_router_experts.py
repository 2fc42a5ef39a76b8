"""Domain -> expert mapping over the real registry: most recent activation wins, taxonomy fallback."""

from __future__ import annotations

import time

from router_model.runtime import ExpertDirectory
from tests._fixtures.registry import build_lora_expert


def test_expert_mapping_with_taxonomy_fallback(mose_home, tmp_path):
    from registry import Registry

    with Registry.open(mose_home) as reg:
        for name in ("med-a", "med-b"):
            expert = build_lora_expert(tmp_path / name, name=name, domains=("medicine",))
            reg.add(expert.manifest_path)
        cardio = build_lora_expert(tmp_path / "cardio", name="cardio", domains=("cardiology",))
        reg.add(cardio.manifest_path)
        reg.activate("med-a")
        time.sleep(0.01)
        reg.activate("med-b")
        directory = ExpertDirectory(reg, fallback="base", refresh_s=0)
        assert directory.expert_for("medicine") == "med-b"  # most recently activated
        assert directory.expert_for("oncology") == "med-b"  # no oncology expert: parent medicine
        assert directory.expert_for("cardiology") == "med-b"  # cardio is only pending
        reg.activate("cardio")
        assert directory.expert_for("cardiology") == "cardio"
        assert directory.expert_for("law") == "base"  # nothing on law's chain
        assert directory.expert_for("not_a_domain") == "base"
        assert directory.vertical("cardiology") == "medicine"
