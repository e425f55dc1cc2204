"""The gradient-masking checks on a briefly AGKD-BML-trained model: label smoothing is the suspect (SPEC.md 1).

The learning rate is small on purpose: at lr 0.02 with momentum, AGKD-BML's label-smoothed (0.5) CE + MART pulls
this weak student to a near-constant output within 8 steps (clean accuracy ~7 %), where every check is vacuous.
"""
from __future__ import annotations

import torch

from training.evaluation.classifier_report import run_attack_on, sanity_checks
from training.config import AttackSpec
from tests.unit.methods.conftest import make_method


def test_robust_accuracy_falls_with_eps_and_more_steps_never_help(train_set, teacher_path):
    method, model, net = make_method("agkd-bml", train_set, {"teacher": teacher_path}, steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = train_set.get(torch.randint(0, len(train_set), (64,), generator=g))
        model.train()
        loss, _ = method.training_step(net, model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = train_set.get(torch.arange(1800, 1928))  # images the steps above are unlikely to have drawn
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.4  # not collapsed: the checks below mean something
    pgd = AttackSpec(name="pgd", steps=10)
    curve = {e: run_attack_on(model, pgd, x, y, e, 0, 128).float().mean().item() for e in (0.03, 0.1, 0.2)}
    assert curve[0.03] >= curve[0.1] >= curve[0.2]
    assert curve[0.03] > curve[0.2]  # it does fall, from a level worth measuring
    flags = sanity_checks(model, x, y, 0.1, curve, seed=0, batch_size=128, n=128)
    assert flags["large_eps"]["pgd20_accuracy"] <= 0.05
    assert flags["more_steps"]["pgd100"] <= flags["more_steps"]["pgd10"] + 0.01
    assert not flags["any_flag"], flags
