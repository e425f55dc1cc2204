"""Shared fixtures: a 2,000-image Fashion-MNIST training set, a fixed batch, and a briefly trained clean teacher."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import save_atomic
from training.config import MethodConfig, TrainConfig
from training.data import load_dataset
from training.methods import build_method
from training.models import build_model

FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def train_set():
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST_DIR} (Debian package dataset-fashion-mnist)")
    full = load_dataset("fashion-mnist", "train", str(FMNIST_DIR))
    return full.subset(torch.arange(2000))


@pytest.fixture(scope="session")
def batch(train_set):
    return train_set.get(torch.arange(64))


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory, train_set):
    """A smallcnn trained clean for 60 steps (~80 % accuracy), saved as a standard checkpoint."""
    torch.manual_seed(0)
    model, spec = build_model("smallcnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = train_set.get(torch.randint(0, len(train_set), (64,), generator=g))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    spec = spec.model_copy(update={"method": "standard"})
    save_atomic({"model": model.state_dict(), "spec": spec.model_dump(mode="json"), "arch_options": {}}, path)
    return str(path)


def make_method(name: str, train_set, options=None, *, steps: int = 3, seed: int = 0, rank: int = 0,
                augment: bool = True):
    """A built method, its fresh smallcnn (set up by the method) and the TrainModule around it, as the trainer
    builds them (same per-rank generator seeding)."""
    from training.device import seed_everything
    from training.trainer import TrainModule

    torch.manual_seed(seed)
    model, spec = build_model("smallcnn")
    cfg = MethodConfig(name=name, options=options or {}, attack_steps=steps)
    tcfg = TrainConfig(method=cfg, seed=seed).model_copy(
        update={"data": TrainConfig().data.model_copy(update={"augment": augment})})
    generator = seed_everything(seed * 1000 + rank)
    method = build_method(cfg, spec=spec, train_set=train_set, device=torch.device("cpu"), generator=generator,
                          rank=rank, world_size=1, train_config=tcfg)
    method.setup(model)
    return method, model, TrainModule(model)
