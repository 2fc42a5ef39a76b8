"""ray_cluster.yaml must be a config the Ray cluster launcher accepts (schema shipped with ray)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]


def _schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_yaml_validates_against_ray_schema():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, _schema())


def test_cluster_has_cpu_head_and_gpu_worker_group():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_groups = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups and all(t["resources"].get("expert_node") == 1 for t in gpu_groups)
    assert any("scripts/bootstrap" in c for c in config["setup_commands"])
    assert any("serve deploy" in c for c in config["head_start_ray_commands"])


def test_schema_check_is_not_vacuous():
    broken = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    broken["available_node_types"]["head_cpu"]["resources"]["CPU"] = "eight"
    try:
        jsonschema.validate(broken, _schema())
    except jsonschema.ValidationError:
        return
    raise AssertionError("the schema accepted a non-integer CPU count")


def test_rayservice_embeds_what_serve_build_prints(monkeypatch):
    """deploy/rayservice.yaml's serveConfigV2 must match `mose serve build` (host 0.0.0.0 for pods)."""
    from serve.app import serve_build_config

    monkeypatch.setenv("MOSE_SERVE__HTTP__HOST", "0.0.0.0")
    service = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == serve_build_config(None, "/mnt/mose")
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any("expert_node" in w["rayStartParams"].get("resources", "") for w in workers)
