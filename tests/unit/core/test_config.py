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


# --- layering: command defaults < --config file < each --set, merged key by key ---------------------------------

def _roots():
    from serving.cli import BENCHES, COMMANDS, ZOO

    roots = {name: cmd.root() for name, cmd in COMMANDS.items()}
    roots.update({f"bench {name}": loader()[0] for name, (_, loader) in BENCHES.items()})
    roots.update({f"zoo {name}": cmd.root() for name, cmd in ZOO.items()})
    return roots


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


def _candidates(value):
    """Values of the leaf's own kind that differ from it (the first that validates is used)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, max(1, value // 2)]
    if isinstance(value, float):
        return [value * 0.5, value * 0.9, value + 1.0, 0.5 if value != 0.5 else 0.25]
    if isinstance(value, str):
        return ["cpu", "0", "x", "adam", "sgd", "constant", "cosine", "linf", "l2", "rob224", "rob28", "margin"]
    if value is None:
        return [1, 0.5, "x", True, 3]
    if isinstance(value, list):
        return [value[:-1], value + value[-1:]] if value else [[1], [0.5], ["x"]]
    if isinstance(value, dict):
        return [{}]
    return []


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@pytest.mark.parametrize("command", sorted(_roots()))
def test_setting_one_leaf_changes_only_that_leaf(command):
    """Walks the command's resolved config tree; every leaf that accepts another value of its kind is set alone
    with --set, and the resolved config must differ from the defaults at that leaf and nowhere else."""
    import yaml

    root = _roots()[command]
    base = load_config(root).model_dump(mode="json")
    tried = changed = 0
    for path, value in _leaves(base):
        if not path:
            continue
        key = ".".join(path)
        for cand in _candidates(value):
            if cand == value:
                continue
            try:
                got = load_config(root, None, [f"{key}={yaml.safe_dump(cand, default_flow_style=True).strip()}"])
            except ConfigError:
                continue
            tried += 1
            got = got.model_dump(mode="json")
            assert _get(got, path) != value, f"{command}: --set {key} did not change {key}"
            diff = [p for p, v in _leaves(got) if p != path and p[:len(path)] != path and _get_or(base, p) != v]
            assert not diff, f"{command}: --set {key}={cand!r} also changed {['.'.join(d) for d in diff]}"
            changed += 1
            break
    assert tried and tried == changed
    n_leaves = sum(1 for p, _ in _leaves(base) if p)
    assert tried >= n_leaves // 2, f"{command}: only {tried} of {n_leaves} leaves could be set"


def _get_or(tree, path):
    try:
        return _get(tree, path)
    except (KeyError, TypeError, IndexError):
        return object()


def test_file_layer_keeps_the_command_defaults(tmp_path):
    from training.bench.robust_embedders import BenchConfig

    f = tmp_path / "c.yaml"
    f.write_text("attack:\n  step: 0.0117\noptim:\n  lr: 0.002\n")
    cfg = load_config(BenchConfig, f, ["data.options.size=28"])
    assert cfg.attack.eps == pytest.approx(77 / 255) and cfg.attack.step == 0.0117
    assert cfg.optim.name == "adam" and cfg.optim.schedule == "constant" and cfg.optim.lr == 0.002
    assert cfg.data.augment is False and cfg.data.options == {"size": 28}


def test_a_scalar_for_a_list_key_is_a_one_element_list():
    assert load_config(EvaluateConfig, None, ["eps=0.05"]).eps == (0.05,)
