"""AGKD-BML's batched targeted PGD: one run over [a; b] equals two runs over a and b."""
from __future__ import annotations

import torch

from serving.runtime.attacks import LpBall, targeted_pgd

BALL = LpBall("linf", 8 / 255, 2 / 255)


def test_batch_equals_its_halves_when_the_generator_continues(model, fmnist):
    x, y = fmnist["x_test"][:48], fmnist["y_test"][:48]
    target = (y + 3) % 10
    model.train()  # the helper must switch to eval itself, or BatchNorm would couple the samples
    g_whole, g_parts = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    whole = targeted_pgd(model, x, target, BALL, steps=10, generator=g_whole)
    a = targeted_pgd(model, x[:20], target[:20], BALL, steps=10, generator=g_parts)
    b = targeted_pgd(model, x[20:], target[20:], BALL, steps=10, generator=g_parts)
    assert torch.equal(whole, torch.cat([a, b]))
    assert torch.equal(g_whole.get_state(), g_parts.get_state())
    assert model.training and all(m.training for m in model.modules())
    assert BALL.contains(whole, x).all()


def test_moves_toward_the_target_and_leaves_no_gradients(model, fmnist):
    x, y = fmnist["x_test"][:200], fmnist["y_test"][:200]
    target = (y + 1) % 10
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(x), target)
    x_adv = targeted_pgd(model, x, target, LpBall("linf", 0.2, 0.02), steps=10,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(x_adv), target)
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert after < 0.5 * before and hit > 0.9
    assert all(p.grad is None for p in model.parameters())


def test_same_generator_seed_same_examples(model, fmnist):
    x, y = fmnist["x_test"][:16], fmnist["y_test"][:16]
    runs = [targeted_pgd(model, x, (y + 1) % 10, BALL, 5, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
