"""The registry: names, options, defaults, the spec it returns, and its errors."""
import json

import pytest
import torch
from torch import nn

from serving.runtime.spec import ModelSpec
from training.models import build_model, default_options, list_models, model_task, register_model
from training.models import registry as registry_module

from ._cases import SMALL_OPTIONS

EXPECTED = {
    "smallcnn": "classification",
    "resnet18-cifar": "classification",
    "wrn-28-10": "classification",
    "c2f2": "embedding",
    "resnet18-embedder": "embedding",
}


def test_list_models_holds_every_model_with_its_task():
    assert list_models() == sorted(EXPECTED)
    assert {name: model_task(name) for name in list_models()} == EXPECTED


def test_every_registered_model_has_small_options():
    assert set(SMALL_OPTIONS) == set(list_models())


def test_unknown_name_names_the_registered_models():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*c2f2.*smallcnn"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="registered models"):
        model_task("nope")


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\].*'dropout'.*'num_classes'"):
        build_model("smallcnn", depth=3)
    # A classifier's head option is not an embedder's.
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model("smallcnn", embedding_dim=8)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("c2f2", num_classes=10)


@pytest.mark.parametrize("name", ["smallcnn", "c2f2"])
def test_28x28_models_default_to_fashion_mnist(name):
    opts = default_options(name)
    assert opts["channels"] == 1 and tuple(opts["input_size"]) == (28, 28)
    assert tuple(opts["mean"]) == (0.2860,) and tuple(opts["std"]) == (0.3530,)
    assert opts["class_names"] is None
    _, spec = build_model(name)
    assert spec.input_size == (28, 28) and spec.mean == (0.2860,) and spec.std == (0.3530,)
    if name == "smallcnn":
        assert spec.num_classes == 10 and spec.embedding_dim is None
    else:
        assert spec.embedding_dim == 512 and spec.num_classes is None


def test_spec_reflects_the_options():
    _, spec = build_model(
        "smallcnn", channels=3, input_size=[32, 30], mean=0.5, std=[0.2, 0.3, 0.4], class_names=["a", "b", "c"]
    )
    assert spec == ModelSpec(
        arch="smallcnn",
        task="classification",
        channels=3,
        input_size=(32, 30),
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.3, 0.4),
        num_classes=3,
        class_names=("a", "b", "c"),
    )
    assert spec.threat_model is None and spec.method is None


def test_embedder_spec_reflects_the_options():
    _, spec = build_model("resnet18-embedder", input_size=32, stem="cifar", embedding_dim=64)
    assert (spec.task, spec.embedding_dim, spec.input_size, spec.num_classes) == ("embedding", 64, (32, 32), None)
    assert spec.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("smallcnn", {"num_classes": 0}, "num_classes must be a positive integer"),
        ("smallcnn", {"num_classes": True}, "num_classes must be a positive integer"),
        ("c2f2", {"embedding_dim": -4}, "embedding_dim must be a positive integer"),
        ("smallcnn", {"channels": 3, "mean": (0.1, 0.2)}, "mean has 2 values for 3 channel"),
        ("smallcnn", {"std": 0.0}, "std must be positive"),
        ("smallcnn", {"input_size": (28, 28, 1)}, "input_size must be"),
        ("smallcnn", {"input_size": 12}, "at least 16x16"),
        ("smallcnn", {"class_names": ["a", "b"], "num_classes": 3}, "class_names has 2 names for 3 classes"),
        ("smallcnn", {"class_names": "abc"}, "class_names must be a list"),
        ("smallcnn", {"dropout": 1.0}, "dropout"),
        ("wrn-28-10", {"depth": 12}, "6n \\+ 4"),
        ("resnet18-embedder", {"stem": "tiny"}, "unknown stem"),
        ("resnet18-embedder", {"input_size": 16}, "at least 32x32"),
    ],
)
def test_invalid_values_are_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **options)


@pytest.mark.parametrize("name", sorted(SMALL_OPTIONS))
def test_same_options_rebuild_the_same_architecture(name):
    """What checkpoint.load_model relies on: the stored options rebuild a module the state dict fits."""
    options = SMALL_OPTIONS[name]
    first, spec1 = build_model(name, **options)
    # Options pass through JSON in a checkpoint's config: tuples come back as lists.
    second, spec2 = build_model(name, **json.loads(json.dumps(options)))
    assert spec1 == spec2
    shapes1 = {k: v.shape for k, v in first.state_dict().items()}
    shapes2 = {k: v.shape for k, v in second.state_dict().items()}
    assert shapes1 == shapes2
    second.load_state_dict(first.state_dict())  # strict: same keys, same shapes
    # The options spelled out from the spec give the same architecture too.
    from_spec = {"channels": spec1.channels, "input_size": spec1.input_size, "mean": spec1.mean, "std": spec1.std}
    third, spec3 = build_model(name, **{**options, **from_spec})
    assert spec3 == spec1
    assert {k: v.shape for k, v in third.state_dict().items()} == shapes1


def test_builds_are_independent_modules():
    a, _ = build_model("smallcnn")
    b, _ = build_model("smallcnn")
    assert a is not b and a.conv1.weight.data_ptr() != b.conv1.weight.data_ptr()


def test_defaults_come_from_the_builder_signature():
    assert default_options("wrn-28-10") == {
        "channels": 3,
        "input_size": (32, 32),
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2471, 0.2435, 0.2616),
        "num_classes": 10,
        "depth": 28,
        "widen_factor": 10,
        "dropout": 0.0,
        "class_names": None,
    }


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, so tests can register toy models without leaking them."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_register_model_infers_task_and_rejects_duplicates(scratch_registry):
    @register_model("toy-embedder")
    def toy(*, channels=1, input_size=(4, 4), mean=(0.0,), std=(1.0,), embedding_dim=3):
        return nn.Flatten()

    assert model_task("toy-embedder") == "embedding"
    model, spec = build_model("toy-embedder", class_names=["x", "y"])
    assert isinstance(model, nn.Flatten) and spec.embedding_dim == 3 and spec.class_names == ("x", "y")
    with pytest.raises(ValueError, match="already registered"):
        register_model("toy-embedder")(toy)


@pytest.mark.parametrize(
    "builder",
    [
        lambda *, channels=1, input_size=(4, 4), mean=(0.0,), std=(1.0,): None,  # no head option
        lambda *, channels=1, input_size=(4, 4), mean=(0.0,), std=(1.0,), num_classes=2, embedding_dim=2: None,
        lambda *, input_size=(4, 4), mean=(0.0,), std=(1.0,), num_classes=2: None,  # no channels
        lambda *, channels=1, input_size=(4, 4), mean=(0.0,), std=(1.0,), num_classes: None,  # no default
    ],
)
def test_register_model_rejects_malformed_builders(scratch_registry, builder):
    with pytest.raises(TypeError):
        register_model("malformed")(builder)
    assert "malformed" not in list_models()


def test_registry_options_are_checked_before_weights_are_built(scratch_registry):
    built = []

    @register_model("counting")
    def counting(*, channels=1, input_size=(4, 4), mean=(0.0,), std=(1.0,), num_classes=2):
        built.append(1)
        return nn.Identity()

    with pytest.raises(ValueError):
        build_model("counting", class_names=["a"], num_classes=2)
    assert built == []
    build_model("counting")
    assert built == [1]


def test_build_model_returns_a_module_in_train_mode():
    model, _ = build_model("smallcnn")
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
