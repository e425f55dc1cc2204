"""Every registered classification method lowers its own loss on a fixed batch within a few steps."""
from __future__ import annotations

import pytest
import torch

from training.methods import list_methods, method_class
from tests.unit.methods.conftest import make_method

CLASSIFIER_METHODS = [m for m in list_methods() if method_class(m).task == "classification"]


def _loss(method, net, model, x, y, seed):
    """The method's loss with every random draw (attack starts, backward sources, dropout) pinned by ``seed``."""
    method.generator.manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    return method.training_step(net, model, x, y)[0]


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(name, train_set, batch, teacher_path):
    assert {"standard", "pgd-at", "trades", "agkd-bml"} <= set(CLASSIFIER_METHODS)
    options = {"teacher": teacher_path} if name == "agkd-bml" else {}
    method, model, net = make_method(name, train_set, options, steps=3)
    x, y = batch[0][:32], batch[1][:32]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        before = _loss(method, net, model, x, y, seed=123).item()
    for step in range(6):
        loss = _loss(method, net, model, x, y, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _loss(method, net, model, x, y, seed=123).item()
    assert after < before, (name, before, after)
