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


def test_rayservice_embeds_what_serve_build_prints():
    """deploy/rayservice.yaml's serveConfigV2 must match `mose serve build --config
    deploy/serve_cluster.yaml` (its path inside the image: /opt/mose)."""
    from serve.app import serve_build_config

    service = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    built = serve_build_config(str(REPO / "deploy" / "serve_cluster.yaml"), "/var/lib/mose")
    built["applications"][0]["args"]["config_path"] = "/opt/mose/deploy/serve_cluster.yaml"
    assert embedded == built
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any("expert_node" in w["rayStartParams"].get("resources", "") for w in workers)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "mose_head" in head["rayStartParams"]["resources"]


def _text_of(path: Path) -> str:
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())  # without comments


def test_no_node_needs_a_shared_filesystem():
    """The cluster configs name a registry database, mount nothing shared, and pin the roles that
    read the head's own files (router, calibrator) to the head."""
    from serve.config import load_config

    launcher = _text_of(REPO / "ray_cluster.yaml")
    service = _text_of(REPO / "deploy" / "rayservice.yaml")
    for text in (launcher, service):
        assert "nfs" not in text.lower() and "efs" not in text.lower() and "MOSE_REGISTRY_URL" in text
    assert "ReadWriteMany" not in service and "emptyDir" in service
    config = load_config(REPO / "deploy" / "serve_cluster.yaml")
    for role in (config.ingress, config.router, config.crosscheck):
        assert "mose_head" in role.resources
    for role in (config.expert_pool, config.full_experts):
        assert "expert_node" in role.resources
    head = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["available_node_types"]["head_cpu"]
    assert head["resources"]["mose_head"] == 1
