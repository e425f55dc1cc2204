import pytest

from serving.configio import ConfigError, load_config
from serving.demo import DemoConfig, _train_config


def test_each_method_is_one_config_value(tmp_path):
    cfg = load_config(DemoConfig, None, ["classifier.method=trades", "embedder.method=triplet"])
    assert (cfg.classifier.method, cfg.embedder.method) == ("trades", "triplet")
    assert (cfg.classifier.arch, cfg.embedder.arch) == ("smallcnn", "c2f2")  # the rest keeps its defaults
    tc = _train_config(cfg.classifier, tmp_path, None)
    assert tc.method.name == "trades" and tc.model.arch == "smallcnn" and tc.method.attack.eps == 0.1
    assert tc.epochs == 1 and tc.max_steps_per_epoch == cfg.classifier.steps


def test_unknown_method_fails_before_any_work():
    with pytest.raises(ConfigError, match="unknown training method"):
        load_config(DemoConfig, None, ["embedder.method=nope"])


def test_the_demo_serves_the_zoos_best_models_unless_told_otherwise():
    from serving.demo import _zoo_models
    from serving.zoo.commands import REPO_ZOO as ZOO, best
    
    found = tuple(n for n in (best(ZOO, "classification"), best(ZOO, "embedding")) if n)
    assert found and _zoo_models(DemoConfig(zoo_dir=str(ZOO))) == found
    assert _zoo_models(DemoConfig(zoo_dir=str(ZOO), zoo_models=())) == ()
    with pytest.raises(FileNotFoundError, match="no zoo model 'nope'"):
        _zoo_models(DemoConfig(zoo_dir=str(ZOO), zoo_models=("nope",)))
