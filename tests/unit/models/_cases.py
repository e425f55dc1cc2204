"""Small builds of every registered model, so the contract tests stay fast on two CPU cores."""
import torch

from training.models import build_model

# Options that shrink each model while keeping its structure (every block type, every head).
# test_every_registered_model_has_small_options fails when a model is registered without an entry here.
SMALL_OPTIONS = {
    "smallcnn": {},
    "c2f2": {"embedding_dim": 32},
    "resnet18-cifar": {"input_size": 16, "num_classes": 5},
    "resnet18-embedder": {"input_size": 64, "embedding_dim": 24},
    "wrn-28-10": {"depth": 10, "widen_factor": 1, "input_size": 16, "num_classes": 7},
}


def build_small(name, seed=0):
    """(model, spec) for ``name`` at its small options, with reproducible random weights."""
    torch.manual_seed(seed)
    return build_model(name, **SMALL_OPTIONS[name])


def batch_for(spec, batch=2, seed=1):
    """[batch, C, H, W] uniform in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, spec.channels, *spec.input_size, generator=gen)
