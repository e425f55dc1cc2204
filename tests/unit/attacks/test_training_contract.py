"""The attack contract for the attacks that run inside training methods (TRADES' KL attack, AGKD-BML's forward and
backward AEs, EST's embedding shift, ACT's collapse, HM's hardness manipulation): each stays in the ball and the box,
leaves its inputs and the model's parameter gradients untouched, and runs the model in eval mode with every
submodule's own flag restored. One table lists them; a guard test keeps it in step with the registered methods."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serving.runtime.attacks import LpBall, targeted_pgd
from serving.runtime.attacks.ranking import embedding_shift_attack
from serving.runtime.spec import ThreatModel
from tests.unit.attacks.test_contract import ModeProbe, set_mode
from training.methods.act import collapse_attack
from training.methods.trades import trades_attack
from training.metric.manipulation import hardness_manipulation

STEPS = 4
NORMS = {"linf": ThreatModel(norm="linf", eps=0.03, step=0.0075), "l2": ThreatModel(norm="l2", eps=1.0, step=0.25)}


class Embedder(nn.Module):
    """A classifier's logits, L2-normalised: an embedder for the ranking-side attacks."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.inner(x), dim=1)


def _trades(model, x, y, ball):
    g = torch.Generator().manual_seed(0)
    return [(trades_attack(model, x, ball, STEPS, 0.001, g), x)]


def _agkd_bml(model, x, y, ball):
    # The forward AE toward another class and the backward AE toward the true class, as one batched run.
    target = (y + 1) % 10
    g = torch.Generator().manual_seed(0)
    adv = targeted_pgd(model, torch.cat([x, x]), torch.cat([target, y]), ball, STEPS, generator=g)
    return [(adv, torch.cat([x, x]))]


def _est(model, x, y, ball):
    return [(embedding_shift_attack(Embedder(model), x, ball, STEPS), x)]


def _act(model, x, y, ball):
    t = x.shape[0] // 2
    xp, xn = x[:t], x[t:2 * t]
    ap, an = collapse_attack(Embedder(model), xp, xn, ball, STEPS)
    return [(ap, xp), (an, xn)]


def _hm(model, x, y, ball):
    t = x.shape[0] // 3
    xa, xp, xn = x[:t], x[t:2 * t], x[2 * t:3 * t]
    r = hardness_manipulation(Embedder(model), xa, xp, xn, torch.tensor(1.5), ball, STEPS, tol=0.0)
    return [(r.xa, xa), (r.xp, xp), (r.xn, xn)]


# Method name -> its attack, run on a batch: [(adversarial images, the images they started from), ...].
TRAINING_ATTACKS: dict[str, Callable] = {"trades": _trades, "agkd-bml": _agkd_bml, "est": _est, "act": _act,
                                         "hm": _hm}
# Methods that attack through the classification attack suite (already under tests/unit/attacks/test_contract.py)
# or not at all.
SUITE_OR_NONE = {"standard", "pgd-at", "triplet"}
CASES = [(m, n) for m in TRAINING_ATTACKS for n in NORMS]


def test_every_registered_method_is_covered():
    from training.methods.base import list_methods

    assert set(list_methods()) == set(TRAINING_ATTACKS) | SUITE_OR_NONE


@pytest.fixture(scope="module")
def batch(fmnist):
    return fmnist["x_test"][:24].clone(), fmnist["y_test"][:24].clone()


@pytest.mark.parametrize("method,norm", CASES)
def test_in_ball_and_box_inputs_untouched_and_perturbed(method, norm, model, batch):
    x, y = batch
    x_before, y_before = x.clone(), y.clone()
    ball = LpBall.from_threat(NORMS[norm])
    pairs = TRAINING_ATTACKS[method](model, x, y, ball)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    moved = []
    for adv, src in pairs:
        assert adv.shape == src.shape and adv.dtype == src.dtype and not adv.requires_grad
        assert ball.contains(adv, src, tol=1e-6).all()
        assert adv.min() >= 0 and adv.max() <= 1
        moved.append(ball.distance(adv, src))
    assert (torch.cat(moved) > 0.25 * ball.eps).any(), "the attack did not move any input"


@pytest.mark.parametrize("method", list(TRAINING_ATTACKS))
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_runs_in_eval_mode_and_restores_every_module_mode(method, mode, model, batch):
    probe = ModeProbe(model)
    before = set_mode(probe, mode)
    TRAINING_ATTACKS[method](probe, *batch, LpBall.from_threat(NORMS["linf"]))
    assert probe.all_eval and all(probe.all_eval)
    assert {m: m.training for m in probe.modules()} == before


@pytest.mark.parametrize("method", list(TRAINING_ATTACKS))
def test_restores_mode_when_the_model_fails(method, model, batch):
    probe = ModeProbe(model, fail_at=2)
    before = set_mode(probe, "mixed")
    with pytest.raises(RuntimeError, match="probe failure"):
        TRAINING_ATTACKS[method](probe, *batch, LpBall.from_threat(NORMS["linf"]))
    assert {m: m.training for m in probe.modules()} == before


@pytest.mark.parametrize("method", list(TRAINING_ATTACKS))
def test_parameter_gradients_untouched(method, model, batch):
    params = list(model.parameters())
    existing = torch.randn_like(params[0])
    params[0].grad = existing.clone()
    TRAINING_ATTACKS[method](model, *batch, LpBall.from_threat(NORMS["linf"]))
    assert torch.equal(params[0].grad, existing)
    assert all(p.grad is None for p in params[1:])
