"""Server config: YAML < environment < explicit overrides, and clear errors naming the field."""

from __future__ import annotations

import pytest

from registry.errors import MoseError
from serve.config import ServeConfig, load_config


def test_defaults_run_on_one_cpu_machine(monkeypatch):
    monkeypatch.delenv("MOSE_ADMIN_TOKEN", raising=False)
    config = load_config()
    assert config.http.host == "127.0.0.1"
    assert config.ray.address is None
    assert config.auth.admin_token is None
    assert config.limits.default_max_tokens <= config.limits.max_tokens


def test_layers_yaml_then_env_then_overrides(tmp_path, monkeypatch):
    path = tmp_path / "serve.yaml"
    path.write_text("http: {port: 9100, host: 0.0.0.0}\nlimits: {max_tokens: 128}\n")
    monkeypatch.setenv("MOSE_SERVE__HTTP__PORT", "9200")
    config = load_config(path, limits={"max_tokens": 64})
    assert config.http.host == "0.0.0.0"  # from YAML
    assert config.http.port == 9200  # env beats YAML
    assert config.limits.max_tokens == 64  # overrides beat both


def test_pool_precision_is_left_to_each_node_unless_set(monkeypatch):
    config = load_config()
    assert config.pool.cpu_dtype is None
    monkeypatch.setenv("MOSE_CPU_DTYPE", "bfloat16")  # a node's own setting, read where the replica starts
    assert config.pool.pool_config(64).policy.cpu_dtype == "bfloat16"
    monkeypatch.setenv("MOSE_SERVE__POOL__CPU_DTYPE", "float32")  # the application's, for every node
    assert load_config().pool.pool_config(64).policy.cpu_dtype == "float32"


def test_a_replica_pool_takes_the_served_settings_and_its_role_s_own():
    config = load_config(pool={"max_batch_size": 4, "batch_wait_timeout_s": 0.05}, limits={"max_tokens": 128})
    pool = config.pool.pool_config(config.limits.max_tokens, load_base=False)
    assert (pool.max_batch_size, pool.batch_wait_s, pool.max_new_tokens_limit) == (4, 0.05, 128)
    assert pool.load_base is False and load_config().pool.pool_config(64).load_base is True


def test_admin_token_short_env_name_is_secret(monkeypatch):
    monkeypatch.setenv("MOSE_ADMIN_TOKEN", "s3cret-token")
    config = load_config()
    assert config.auth.admin_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(config)
    assert "s3cret-token" not in config.model_dump_json()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"limits": {"max_tokens": 0}}, "limits.max_tokens: Input should be greater than 0"),
        ({"http": {"port": 70000}}, "http.port: Input should be less than or equal to 65535"),
        ({"limits": {"max_tokens": 8, "default_max_tokens": 16}}, "default_max_tokens (16) exceeds max_tokens (8)"),
        ({"upstreams": {"big": {"base_url": ""}}}, "upstream 'big' needs a base_url"),
        ({"expert_pool": {"num_gpus": 2}}, "expert_pool.num_gpus: Input should be less than or equal to 1"),
        ({"no_such_section": {}}, "no_such_section: Extra inputs are not permitted"),
        ({"pool": {"cpu_dtype": "fp16"}}, "pool.cpu_dtype: Input should be 'auto', 'float32' or 'bfloat16'"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(MoseError) as err:
        load_config(**overrides)
    assert message in str(err.value)


def test_bad_yaml_file_is_reported(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("http: [unclosed\n")
    with pytest.raises(MoseError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(MoseError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(ServeConfig)


def test_unset_flags_do_not_override(monkeypatch):
    monkeypatch.setenv("MOSE_SERVE__HTTP__HOST", "0.0.0.0")
    config = load_config(http={"host": None, "port": 9300}, ray={"address": None})
    assert (config.http.host, config.http.port, config.ray.address) == ("0.0.0.0", 9300, None)


@pytest.mark.parametrize(
    "auth, mode",
    [
        ({}, "off"),  # the README's `mose up` / `make start`: no token, admin endpoints absent
        ({"admin_token": "t0ken"}, "token"),
        ({"insecure_local": True}, "insecure"),
        ({"admin_enabled": True, "admin_token": "t0ken"}, "token"),
        ({"admin_enabled": True, "insecure_local": True}, "insecure"),
        ({"admin_enabled": False, "admin_token": "t0ken"}, "off"),
    ],
)
def test_admin_mode_follows_token_and_switches(monkeypatch, auth, mode):
    monkeypatch.delenv("MOSE_ADMIN_TOKEN", raising=False)
    assert load_config(auth=auth).auth.admin_mode == mode


def test_admin_enabled_without_a_token_names_the_ways_out(monkeypatch):
    monkeypatch.delenv("MOSE_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("MOSE_SERVE__AUTH__ADMIN_ENABLED", "true")
    with pytest.raises(MoseError) as err:
        load_config()
    assert "MOSE_ADMIN_TOKEN" in str(err.value) and "auth.insecure_local" in str(err.value)


@pytest.mark.parametrize(
    "host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("192.168.1.5", False)]
)
def test_insecure_local_only_listens_on_loopback(monkeypatch, host, ok):
    monkeypatch.delenv("MOSE_ADMIN_TOKEN", raising=False)
    if ok:
        assert load_config(auth={"insecure_local": True}, http={"host": host}).auth.admin_mode == "insecure"
    else:
        with pytest.raises(MoseError, match="http.host must be a loopback address"):
            load_config(auth={"insecure_local": True}, http={"host": host})
    # With a token, insecure_local changes nothing and any address is fine.
    assert (
        load_config(auth={"insecure_local": True, "admin_token": "t0ken"}, http={"host": host}).auth.admin_mode
        == "token"
    )
