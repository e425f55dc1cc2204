"""One contract, checked for every registered attack in both norms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from serving.runtime.spec import ThreatModel
from serving.runtime.attacks import build_attack, get_attack, list_attacks
from tests.unit.attacks._cases import FAST_BUDGET, fast_options

NORMS = {"linf": ThreatModel(norm="linf", eps=0.03, step=0.0075), "l2": ThreatModel(norm="l2", eps=1.0, step=0.25)}
CASES = [(name, norm) for name in list_attacks() for norm in NORMS]
FAST = {name: fast_options(name) for name in list_attacks()}


def test_registry_lists_the_suite():
    assert list_attacks() == ["apgd-ce", "apgd-dlr", "apgd-t", "cw", "fgsm", "pgd"]
    with pytest.raises(ValueError, match="choose one of"):
        build_attack("pgd-typo", nn.Linear(2, 2), NORMS["linf"])


def test_fast_budget_cuts_every_costly_option():
    """Guard for the derived tables: an attack whose constructor has an integer option defaulting above 3 that
    FAST_BUDGET does not cut (a new iteration count, say) fails here, instead of slowing every contract test."""
    for name in list_attacks():
        costly = {k for k, v in get_attack(name).defaults().items()
                  if isinstance(v, int) and not isinstance(v, bool) and v > 3}
        assert costly <= set(FAST_BUDGET), (name, costly - set(FAST_BUDGET))


@pytest.mark.parametrize("name", list_attacks())
def test_labels_carry_the_step_budget(name):
    cls = get_attack(name)
    steps = cls.defaults()["steps"]
    lab = cls.label(steps, **{k: v for k, v in cls.defaults().items() if k == "n_target_classes"})
    assert lab.startswith(cls.title) and (lab == cls.title if not cls.takes("steps") else f"-{steps}" in lab)
    assert {"fgsm": "FGSM", "pgd": "PGD-10", "cw": "CW-10", "apgd-ce": "APGD-CE-100", "apgd-dlr": "APGD-DLR-100",
            "apgd-t": "APGD-T-100x9"}.get(name, lab) == lab


class ModeProbe(nn.Module):
    """Wraps a model; records whether every submodule was in eval mode at each forward, and can fail
    on the n-th forward to test restoration on error."""

    def __init__(self, inner: nn.Module, fail_at: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.all_eval: list[bool] = []
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.all_eval.append(not any(m.training for m in self.modules()))
        if self.fail_at and len(self.all_eval) >= self.fail_at:
            raise RuntimeError("probe failure")
        return self.inner(x)


def make(name, model, norm, seed=0):
    return build_attack(name, model, NORMS[norm], seed=seed, **FAST[name])


@pytest.fixture(scope="module")
def batch(fmnist):
    return fmnist["x_test"][:24].clone(), fmnist["y_test"][:24].clone()


def set_mode(model: nn.Module, mode: str) -> dict[nn.Module, bool]:
    model.train(mode != "eval")
    if mode == "mixed":  # e.g. frozen BatchNorm inside a training model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return {m: m.training for m in model.modules()}


@pytest.mark.parametrize("name,norm", CASES)
def test_output_in_ball_and_box_input_untouched_and_perturbed(name, norm, model, batch):
    x, y = batch
    x_before, y_before = x.clone(), y.clone()
    attack = make(name, model, norm)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert attack.ball.contains(x_adv, x, tol=1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert x_adv.data_ptr() != x.data_ptr()
    moved = attack.ball.distance(x_adv, x)
    assert (moved > 0.5 * attack.ball.eps).any(), "the attack did not move the input"


@pytest.mark.parametrize("name,norm", CASES)
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_runs_in_eval_mode_and_restores_every_module_mode(name, norm, mode, model, batch):
    probe = ModeProbe(model)
    before = set_mode(probe, mode)
    make(name, probe, norm)(*batch)
    assert probe.all_eval and all(probe.all_eval)
    assert {m: m.training for m in probe.modules()} == before


@pytest.mark.parametrize("name", list_attacks())
def test_restores_mode_when_the_model_fails(name, model, batch):
    probe = ModeProbe(model, fail_at=1)
    before = set_mode(probe, "mixed")
    with pytest.raises(RuntimeError, match="probe failure"):
        make(name, probe, "linf")(*batch)
    assert {m: m.training for m in probe.modules()} == before


@pytest.mark.parametrize("name,norm", CASES)
def test_parameter_gradients_untouched(name, norm, model, batch):
    params = list(model.parameters())
    existing = torch.randn_like(params[0])
    params[0].grad = existing.clone()
    make(name, model, norm)(*batch)
    assert torch.equal(params[0].grad, existing)
    assert all(p.grad is None for p in params[1:])


@pytest.mark.parametrize("name,norm", CASES)
def test_same_seed_same_examples(name, norm, model, batch):
    a = make(name, model, norm, seed=5)(*batch)
    b = make(name, model, norm, seed=5)(*batch)
    assert torch.equal(a, b)
    if name != "fgsm":  # FGSM draws nothing; the others start at random points
        c = make(name, model, norm, seed=6)(*batch)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name", list_attacks())
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(name, context, model, batch):
    ref = make(name, model, "linf")(*batch)
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        x, y = batch[0].clone(), batch[1].clone()
        got = make(name, model, "linf")(x, y)
    assert torch.equal(got, ref)


def test_inputs_are_validated(model, batch):
    x, y = batch
    attack = make("pgd", model, "linf")
    with pytest.raises(ValueError, match="Normalisation belongs inside the model"):
        attack((x - 0.5) / 0.5, y)
    with pytest.raises(ValueError, match="int64"):
        attack(x, y.float())
    with pytest.raises(ValueError, match="targeted"):
        attack(x, y, target=(y + 1) % 10)
    with pytest.raises(ValueError, match="exactly one step"):
        build_attack("fgsm", model, NORMS["linf"], steps=20)


def test_a_new_attack_is_one_class_and_one_registration(monkeypatch, model, batch):
    """The README's recipe: a subclass with a name, a title and a constructor is all the suite, configs, labels and
    probes need."""
    from serving.runtime.attacks import Attack, base, register_attack
    from serving.runtime.evaluation.classification import AttackSpec, label
    from serving.runtime.probing.params import classifier_attacks

    monkeypatch.setattr(base, "_ATTACKS", dict(base._ATTACKS))  # the registration ends with this test

    @register_attack
    class UniformNoise(Attack):
        """Uniform noise in the ball: a toy for the registry."""

        name = "toy-noise"
        title = "NOISE"
        probe = False

        def __init__(self, model, ball, steps: int = 3, *, restarts: int = 1, seed: int = 0, generator=None):
            super().__init__(model, ball, seed=seed, generator=generator)
            self.steps = steps

        def perturb(self, x, y, target):
            return self.ball.random_start(x, self.generator)

    assert "toy-noise" in list_attacks() and "toy-noise" not in classifier_attacks()
    spec = AttackSpec(name="toy-noise")
    assert spec.steps == 3 and label(spec) == "NOISE-3"
    x, y = batch
    xa = build_attack("toy-noise", model, NORMS["linf"])(x, y)
    assert float((xa - x).abs().max()) <= NORMS["linf"].eps + 1e-6 and 0 <= float(xa.min()) <= float(xa.max()) <= 1
