import re

import pytest
import yaml

from serving.configio import ConfigError, load_config
from serving.serve import HANDLER_METRICS, ServeConfig, archives, config_properties, is_loopback, metrics_yaml


def props(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v.replace("\\\\", "\\")
    return out


@pytest.fixture
def store(tmp_path):
    s = tmp_path / "store"
    s.mkdir()
    (s / "a.mar").write_bytes(b"")
    (s / "b.mar").write_bytes(b"")
    return s


def test_safe_defaults(store, tmp_path):
    cfg = ServeConfig(model_store=str(store), workdir=str(tmp_path / "w"))
    p = props(config_properties(cfg))
    for key in ("inference_address", "management_address", "metrics_address"):
        assert p[key].startswith("http://127.0.0.1:"), key
    # gRPC starts whether or not it is configured: it must be pinned to loopback too.
    assert p["grpc_inference_address"] == p["grpc_management_address"] == "127.0.0.1"
    assert p["grpc_inference_port"] == "7070" and p["grpc_management_port"] == "7071"
    assert p["disable_token_authorization"] == "false"
    assert p["enable_model_api"] == "false"
    assert p["metrics_mode"] == "prometheus"
    assert int(p["max_request_size"]) <= 8 << 20 and int(p["max_response_size"]) <= 8 << 20
    assert p["load_models"] == "a.mar,b.mar"
    assert p["install_py_dep_per_model"] == "false"
    allowed = re.compile(p["allowed_urls"])
    assert allowed.fullmatch(f"file://{store.resolve()}/a.mar")
    for url in ("https://example.com/m.mar", f"file://{store.resolve()}/../x.mar", "file:///etc/passwd"):
        assert not allowed.fullmatch(url), url
    assert p["metrics_config"].endswith("metrics.yaml")


def test_models_selected_and_missing_ones_reported(store, tmp_path):
    cfg = ServeConfig(model_store=str(store), models=("b",))
    assert [a.name for a in archives(cfg)] == ["b.mar"]
    with pytest.raises(FileNotFoundError, match="c.mar"):
        archives(ServeConfig(model_store=str(store), models=("c",)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .mar"):
        archives(ServeConfig(model_store=str(empty)))


def test_non_loopback_must_be_asked_for():
    with pytest.raises(ValueError, match="allow_non_loopback"):
        ServeConfig(host="0.0.0.0")
    cfg = ServeConfig(host="0.0.0.0", allow_non_loopback=True)
    assert cfg.host == "0.0.0.0"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_ports_distinct_and_cli_overrides():
    with pytest.raises(ConfigError, match="distinct"):
        load_config(ServeConfig, None, ["ports.metrics=8080"])
    cfg = load_config(ServeConfig, None, ["ports.inference=9080", "token_auth=false"])
    assert cfg.ports.inference == 9080 and not cfg.token_auth
    with pytest.raises(ConfigError):
        load_config(ServeConfig, None, ["prots.inference=1"])


def test_metrics_yaml_declares_the_handler_metrics():
    doc = yaml.safe_load(metrics_yaml())
    declared = {m["name"] for kind in doc["model_metrics"].values() for m in kind}
    assert {m["name"] for ms in HANDLER_METRICS.values() for m in ms} <= declared
    assert all(m["dimensions"][:2] == ["ModelName", "Level"] for kind in doc["model_metrics"].values() for m in kind)
    # Probe metrics carry their own labels after the two TorchServe adds, in the order the handler sends them.
    from serving.runtime.probing.metrics import CONFIG_LABEL, PROBE_METRICS, SERVER_PREFIX

    by_name = {m["name"]: (kind, m["dimensions"]) for kind, ms in doc["model_metrics"].items() for m in ms}
    for suffix, (kind, _, labels) in PROBE_METRICS.items():
        extra = [CONFIG_LABEL] if kind == "gauge" else []  # a gauge names its probe's config (TorchServe keeps all)
        assert by_name[SERVER_PREFIX + suffix] == (kind, ["ModelName", "Level", *labels, *extra])
    assert "Requests4XX" in {m["name"] for m in doc["ts_metrics"]["counter"]}
