"""Shared fixtures: a tiny CNN trained for a few seconds on 2,000 real Fashion-MNIST images."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
N_TRAIN, N_TEST = 2000, 1000


def read_idx(path: Path, count: int) -> np.ndarray:
    """First ``count`` items of an IDX gz file (images: [N, H, W] uint8; labels: [N] uint8)."""
    with gzip.open(path, "rb") as f:
        magic = int.from_bytes(f.read(4), "big")
        ndim = magic & 0xFF
        if magic >> 8 != 0x08:  # unsigned-byte payload
            raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
        dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        dims[0] = min(dims[0], count)
        data = f.read(int(np.prod(dims)))
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def load_split(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = FMNIST_DIR / f"{split}-images-idx3-ubyte.gz"
    labels = FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST_DIR} (Debian package dataset-fashion-mnist; `make setup`)")
    x = torch.from_numpy(read_idx(images, count).copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(read_idx(labels, count).astype(np.int64))
    return x, y


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TinyCNN(nn.Module):
    """[B, 1, 28, 28] in [0, 1] -> logits [B, 10]. BatchNorm and Dropout make train/eval mode matter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Normalize(0.286, 0.353),
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="session")
def fmnist() -> dict[str, torch.Tensor]:
    xtr, ytr = load_split("train", N_TRAIN)
    xte, yte = load_split("t10k", N_TEST)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


@pytest.fixture(scope="session")
def trained_model(fmnist) -> TinyCNN:
    """Trained for 300 Adam steps (~3 s on 2 cores); returned in eval mode. Tests that change its mode
    or gradients must work on a copy (see ``model`` below)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        x, y = fmnist["x_train"], fmnist["y_train"]
        model.train()
        for _ in range(300):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


@pytest.fixture
def model(trained_model) -> TinyCNN:
    """A private copy of the trained model, free to be put in train mode or given gradients."""
    import copy

    return copy.deepcopy(trained_model)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
