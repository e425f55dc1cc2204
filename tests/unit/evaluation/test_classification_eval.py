import json

import pytest
import torch
from torch import nn

from training.checkpoint import load_model
from training.config import AttackSpec, EvaluateConfig
from training.evaluation.classifier_report import (cascade, evaluate_classifier, format_table, run_attack_on,
                                                sanity_checks, wilson_interval)
from training.evaluation.run import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def points(fmnist_standard):
    from training.data import load_dataset
    from training.trainer import fixed_subset

    model, spec, _ = load_model(fmnist_standard / "model.pt")
    test = load_dataset("fashion-mnist", "test")
    x, y = test.get(fixed_subset(len(test), 300, 1))
    return model, x, y


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_cascade_is_worst_case_per_point(points):
    model, x, y = points
    suite = [AttackSpec(name="fgsm", steps=1), AttackSpec(name="pgd", steps=10), AttackSpec(name="cw", steps=10)]
    eps = 0.03
    cum, robust, _ = cascade(model, suite, x, y, eps, seed=0, batch_size=128)
    values = list(cum.values())
    assert all(a >= b for a, b in zip(values, values[1:])), cum
    assert abs(values[-1] - robust.float().mean().item()) < 1e-6
    # Every attack alone leaves at least as many robust points as the cascade: the cascade is the worst case.
    for a in suite:
        alone = run_attack_on(model, a, x, y, eps, seed=0, batch_size=128).float().mean().item()
        assert robust.float().mean().item() <= alone + 1e-9, (a.name, alone)
    # A point the cascade calls robust was classified correctly when clean.
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert not (robust & ~clean).any()


def test_accuracy_falls_with_eps_and_reaches_zero(points):
    model, x, y = points
    suite = [AttackSpec(name="pgd", steps=10)]
    accs = [cascade(model, suite, x, y, e, 0, 128)[1].float().mean().item() for e in (0.0, 0.01, 0.05, 0.5)]
    assert accs[0] > 0.8 and accs == sorted(accs, reverse=True) and accs[-1] <= 0.01, accs


def test_sanity_flags_clear_on_an_honest_model(points):
    model, x, y = points
    curve = {e: cascade(model, [AttackSpec(name="pgd", steps=10)], x, y, e, 0, 128)[1].float().mean().item()
             for e in (0.01, 0.03)}
    flags = sanity_checks(model, x, y, 0.01, curve, seed=0, batch_size=128, n=200)
    assert not flags["any_flag"], flags
    assert flags["more_steps"]["pgd100"] <= flags["more_steps"]["pgd10"] + 0.01


class SoftmaxQuantised(nn.Module):
    """A gradient-masking defence: inputs quantised to 4 levels (zero gradients almost everywhere), softmax outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        q = x + ((x * 3).round() / 3 - x).detach() * 0  # identity in value, then a true step function below
        q = torch.floor(q * 4).clamp(max=3) / 3
        return self.inner(q).softmax(1)


def test_sanity_flags_catch_gradient_masking(points):
    model, x, y = points
    masked = SoftmaxQuantised(model).eval()
    flags = sanity_checks(masked, x, y, 0.05, {0.05: 0.5}, seed=0, batch_size=128, n=200)
    assert flags["zero_gradients"]["flag"] and flags["softmax_outputs"]["flag"] and flags["any_flag"]


def test_evaluate_writes_report_table_and_plot(fmnist_standard, tmp_path):
    cfg = EvaluateConfig(checkpoint=str(fmnist_standard / "model.pt"), subset=200, eps=(0.05,), curve_eps=(0.02,),
                         attacks=(AttackSpec(name="fgsm", steps=1), AttackSpec(name="pgd", steps=5)),
                         out_dir=str(tmp_path), sanity_checks=False)
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["n"] == 200 and saved["points"].startswith("first 200")
    assert [r["eps"] for r in saved["results"]] == [0.02, 0.05]
    assert (tmp_path / "robustness_curve.png").stat().st_size > 5000
    assert "PGD-5" in report["table"] and "worst case" in report["table"]
    assert format_table(saved).count("\n") == 2  # header, rule, the one table eps


def test_attack_spec_validated_against_the_registry_with_per_attack_steps():
    from pydantic import ValidationError

    from serving.runtime.evaluation.classification import label

    assert AttackSpec(name="fgsm").steps == 1  # the one-step attack needs no steps
    assert [label(AttackSpec(name=n)) for n in ("fgsm", "pgd", "apgd-ce", "apgd-t")] == \
        ["FGSM", "PGD-10", "APGD-CE-100", "APGD-T-100x9"]
    assert label(AttackSpec(name="apgd-t", steps=50, n_target_classes=3)) == "APGD-T-50x3"
    assert EvaluateConfig.model_validate({"attacks": [{"name": "fgsm"}]}).attacks[0].steps == 1
    with pytest.raises(ValidationError, match="choose one of"):
        AttackSpec(name="pgd-typo")
    with pytest.raises(ValidationError, match="exactly 1 step"):
        AttackSpec(name="fgsm", steps=20)


def test_gradient_checks_restore_each_submodules_mode():
    """One eval-mode helper everywhere: a model trained with BatchNorm frozen (mixed modes) keeps them."""
    from training.evaluation.classifier_report import gradient_checks

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).train()
    model[1].eval()
    gradient_checks(model, torch.rand(4, 1, 28, 28), torch.arange(4))
    assert [m.training for m in model] == [True, False, True, True]
