import pytest
import torch

from training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


@pytest.fixture(scope="session")
def fmnist_standard(tmp_path_factory):
    """SmallCNN trained with `standard` for 2 full epochs on Fashion-MNIST: the Foundation acceptance budget."""
    from training.trainer import train

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("standard")
    cfg = TrainConfig(data=DataConfig(name="fashion-mnist", augment=False),
                      model=ModelConfig(arch="smallcnn", options={"dropout": 0.0}),
                      optim=OptimConfig(name="adam", lr=1e-3, weight_decay=0.0), epochs=2,
                      batch_size=128, out_dir=str(out), seed=0)
    train(cfg)
    return out
