"""AGKD-BML's pieces: most-confusing class, backward-AE sources, the batched PGD call, teacher handling."""
from __future__ import annotations

import pytest
import torch

from serving.runtime.attacks import LpBall, targeted_pgd
from training.methods.agkd_bml import backward_sources, forward_backward_aes, most_confusing_class
from tests.unit.methods.conftest import make_method


def test_most_confusing_class_is_the_top_other_class_and_never_the_label():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g)
    y = torch.randint(0, 10, (200,), generator=g)
    logits[:100] = logits[:100].scatter(1, y[:100, None], 50.0)  # half the rows: the label is the top class
    c = most_confusing_class(logits, y)
    assert (c != y).all()
    for i in range(200):
        others = [k for k in range(10) if k != int(y[i])]
        assert int(c[i]) == max(others, key=lambda k: float(logits[i, k]))


@pytest.mark.parametrize("augment", [False, True])
def test_backward_source_has_the_most_confusing_class_label(train_set, augment):
    classes = torch.arange(10).repeat(8)
    xs, ys, idx = backward_sources(train_set, classes, torch.Generator().manual_seed(1), augment)
    assert torch.equal(ys, classes)
    assert torch.equal(train_set.labels[idx], classes)
    assert xs.shape == (80, 1, 28, 28) and float(xs.min()) >= 0 and float(xs.max()) <= 1
    if not augment:
        assert torch.equal(xs, train_set.get(idx)[0])


def test_backward_sources_differ_per_rank(train_set):
    """Each rank's generator (seeded seed * 1000 + rank by the trainer) draws its own backward sources."""
    m0, _, _ = make_method("standard", train_set, rank=0)
    m1, _, _ = make_method("standard", train_set, rank=1)
    classes = torch.arange(10).repeat(6)
    _, y0, i0 = backward_sources(train_set, classes, m0.generator, True)
    _, y1, i1 = backward_sources(train_set, classes, m1.generator, True)
    assert torch.equal(y0, classes) and torch.equal(y1, classes)
    assert (i0 != i1).float().mean() > 0.5


def test_one_batched_pgd_call_equals_two_separate_calls(train_set, batch, teacher_path):
    from training.checkpoint import load_model

    model, _, _ = load_model(teacher_path)
    model.train()  # the attack must switch to eval mode itself (dropout would break batch consistency)
    x, y = batch[0][:16], batch[1][:16]
    with torch.no_grad():
        c = most_confusing_class(model.eval()(x), y)
    model.train()
    xs, _, _ = backward_sources(train_set, c, torch.Generator().manual_seed(3), True)
    ball = LpBall("linf", 0.1, 0.01)
    g = torch.Generator().manual_seed(7)
    x_f, x_b = forward_backward_aes(model, x, c, xs, y, ball, 5, g)
    g2 = torch.Generator().manual_seed(7)
    sep_f = targeted_pgd(model, x, c, ball, 5, generator=g2)
    sep_b = targeted_pgd(model, xs, y, ball, 5, generator=g2)
    torch.testing.assert_close(x_f, sep_f, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_b, sep_b, rtol=0, atol=1e-6)
    assert model.training
    assert bool(ball.contains(x_f, x).all()) and bool(ball.contains(x_b, xs).all())
    assert not torch.equal(x_f, x)  # it did move


def test_student_starts_from_the_frozen_teacher_which_never_changes(train_set, batch, teacher_path):
    method, model, net = make_method("agkd-bml", train_set, {"teacher": teacher_path})
    teacher = method.teacher
    for (k, s), t in zip(model.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), k
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss, figs = method.training_step(net, model, *batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(s, before[k]) for k, s in model.state_dict().items())
    assert {"ce", "mart", "at", "bml"} <= set(figs)


def test_total_is_the_weighted_sum_and_ablations_drop_their_term(train_set, batch, teacher_path):
    losses = {}
    for name, opts in {"full": {}, "at_only": {"w_bml": 0.0}, "bml_only": {"w_at": 0.0}}.items():
        method, model, net = make_method("agkd-bml", train_set, {"teacher": teacher_path, **opts})
        torch.manual_seed(0)  # same dropout masks
        loss, f = method.training_step(net, model, *batch)
        losses[name] = (loss.item(), f)
    for name, (total, f) in losses.items():
        w_at = 0.0 if name == "bml_only" else 1.0
        w_bml = 0.0 if name == "at_only" else 2.0
        assert total == pytest.approx(f["ce"] + f["mart"] + w_at * f["at"] + w_bml * f["bml"], rel=1e-5)
    assert losses["full"][1]["at"] > 0 and losses["full"][1]["bml"] > 0


def test_teacher_of_another_architecture_is_refused(train_set, tmp_path):
    from training.checkpoint import save_atomic
    from training.models import build_model

    other, spec = build_model("c2f2")
    path = tmp_path / "model.pt"
    save_atomic({"model": other.state_dict(), "spec": spec.model_dump(mode="json"), "arch_options": {}}, path)
    with pytest.raises(ValueError, match="same architecture"):
        make_method("agkd-bml", train_set, {"teacher": str(path)})


def test_missing_teacher_option_is_a_config_error():
    from pydantic import ValidationError

    from training.config import MethodConfig, TrainConfig

    with pytest.raises(ValidationError, match="teacher"):
        TrainConfig(method=MethodConfig(name="agkd-bml"))


def test_label_smoothing_ramps_to_the_published_value_and_resumes(train_set, batch, teacher_path):
    """With a ramp, the smoothing rises linearly from 0 over the given epochs, then stays at label_smoothing; the
    step count travels in the method's state, so a resumed run continues the ramp."""
    method, model, net = make_method("agkd-bml", train_set, {"teacher": teacher_path, "label_smoothing": 0.5,
                                                             "label_smoothing_ramp_epochs": 1.0}, steps=1)
    per_epoch = method.steps_per_epoch
    assert per_epoch == len(train_set) // 128
    assert method.smoothing() == 0.0
    x, y = batch
    _, figs = method.training_step(net, model, x, y)
    assert figs["smoothing"] == 0.0 and method.steps_done == 1
    method.load_state_dict({"steps_done": per_epoch // 2})
    assert method.smoothing() == pytest.approx(0.5 * (per_epoch // 2) / per_epoch)
    method.load_state_dict({"steps_done": 10 * per_epoch})
    assert method.smoothing() == 0.5
    constant, _, _ = make_method("agkd-bml", train_set, {"teacher": teacher_path})
    assert constant.smoothing() == 0.5


def test_mart_weight_ramps_to_w_mart_and_enters_the_loss(train_set, batch, teacher_path):
    """With a MART ramp the weight rises linearly from 0 over the given epochs and then stays at w_mart; the loss
    the step returns is the weighted sum with the ramp's weight of that step."""
    method, model, net = make_method("agkd-bml", train_set, {"teacher": teacher_path, "w_mart": 2.0,
                                                             "mart_ramp_epochs": 2.0}, steps=1)
    per_epoch = method.steps_per_epoch
    assert method.mart_weight() == 0.0
    x, y = batch
    loss, figs = method.training_step(net, model, x, y)
    o = method.options
    assert figs["w_mart"] == 0.0
    assert loss.item() == pytest.approx(o.w_ce * figs["ce"] + o.w_at * figs["at"] + o.w_bml * figs["bml"], rel=1e-5)
    method.load_state_dict({"steps_done": per_epoch})
    assert method.mart_weight() == pytest.approx(2.0 * per_epoch / (2 * per_epoch))
    loss, figs = method.training_step(net, model, x, y)
    assert figs["w_mart"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(figs["ce"] + figs["mart"] + figs["at"] + 2.0 * figs["bml"], rel=1e-5)
    method.load_state_dict({"steps_done": 10 * per_epoch})
    assert method.mart_weight() == 2.0
    constant, _, _ = make_method("agkd-bml", train_set, {"teacher": teacher_path})
    assert constant.mart_weight() == 1.0


def test_bench_recipe_ramps_both_and_ablations_change_one_thing():
    from training.bench.robust_classifiers import AGKD_RECIPE, VARIANTS

    assert VARIANTS["agkd-bml"] == ("agkd-bml", AGKD_RECIPE)
    assert AGKD_RECIPE == {"label_smoothing_ramp_epochs": 1.0, "mart_ramp_epochs": 1.0}
    assert VARIANTS["agkd-bml-published"] == ("agkd-bml", {})
    for name, (method, opts) in VARIANTS.items():
        if method == "agkd-bml" and name not in ("agkd-bml", "agkd-bml-published"):
            differs = {k for k in {*opts, *AGKD_RECIPE} if opts.get(k) != AGKD_RECIPE.get(k)}
            assert len(differs) == 1, (name, differs)
