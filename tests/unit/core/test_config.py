import pytest

from serving.configio import ConfigError, apply_overrides, load_config, parse_override
from serving.runtime.spec import ModelSpec, ThreatModel
from training.config import EvaluateConfig, TrainConfig


def test_override_parses_yaml_scalars_and_lists():
    assert parse_override("optim.lr=0.01") == (["optim", "lr"], 0.01)
    assert parse_override("eps=[0.1, 0.2]") == (["eps"], [0.1, 0.2])
    assert parse_override("data.root=null") == (["data", "root"], None)
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_overrides_apply_after_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\noptim:\n  lr: 0.2\n")
    cfg = load_config(TrainConfig, f, ["optim.lr=0.01", "method.name=standard"])
    assert cfg.epochs == 5 and cfg.optim.lr == 0.01 and cfg.optim.name == "sgd"


def test_unknown_keys_rejected_with_their_path(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(TrainConfig, None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="bogus"):
        load_config(TrainConfig, None, ["method.options.bogus=1"])
    with pytest.raises(ConfigError, match="unknown training method"):
        load_config(TrainConfig, None, ["method.name=nope"])


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.epochs = 3  # type: ignore[misc]


def test_overrides_do_not_mutate_input():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2}}


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(EvaluateConfig, tmp_path / "absent.yaml")


def test_model_spec_validation():
    ok = dict(arch="x", task="classification", channels=1, input_size=(28, 28), mean=(0.5,), std=(0.5,),
              num_classes=10, threat_model=ThreatModel(eps=0.1, step=0.01))
    assert ModelSpec(**ok).num_classes == 10
    with pytest.raises(ValueError, match="mean/std"):
        ModelSpec(**{**ok, "mean": (0.5, 0.5)})
    with pytest.raises(ValueError, match="num_classes"):
        ModelSpec(**{**ok, "num_classes": None})
    with pytest.raises(ValueError, match="class_names"):
        ModelSpec(**{**ok, "class_names": ("a", "b")})
