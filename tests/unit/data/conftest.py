from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_dataset_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FASHION_MNIST_DIR", "CIFAR10_DIR", "SVHN_DIR"):
        monkeypatch.delenv(var, raising=False)
