import json

import pytest
import torch

from training.checkpoint import load_model
from training.config import DataConfig, MethodConfig, TrainConfig
from training.trainer import train


def small_cfg(out, **kw):
    base = dict(data=DataConfig(name="fashion-mnist", train_subset=512), epochs=2, batch_size=64,
                out_dir=str(out), seed=3, eval_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_outputs_and_spec(tmp_path):
    out = train(small_cfg(tmp_path))
    for f in ("model.pt", "last.pt", "config.yaml", "metrics.jsonl"):
        assert (out / f).is_file(), f
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert all(m["seconds"] > 0 and "loss" in m for m in lines)
    model, spec, ckpt = load_model(out / "model.pt")
    assert spec.arch == "smallcnn" and spec.method == "standard" and spec.threat_model is None
    assert spec.num_classes == 10 and spec.class_names[0] == "T-shirt/top"
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert ckpt["config"]["seed"] == 3


def test_seeded_runs_are_identical(tmp_path):
    a = train(small_cfg(tmp_path / "a", epochs=1))
    b = train(small_cfg(tmp_path / "b", epochs=1))
    sa, sb = torch.load(a / "model.pt")["model"], torch.load(b / "model.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    """A run interrupted in its second epoch and started again ends where an uninterrupted run ends."""
    from training.methods.standard import Standard

    full = train(small_cfg(tmp_path / "full"))
    part = tmp_path / "part"
    original = Standard.training_step
    calls = {"n": 0}

    def crash_in_epoch_two(self, *a):
        calls["n"] += 1
        if calls["n"] == 11:  # 8 steps per epoch: the third step of epoch 2
            raise KeyboardInterrupt
        return original(self, *a)

    monkeypatch.setattr(Standard, "training_step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(part))
    monkeypatch.setattr(Standard, "training_step", original)
    train(small_cfg(part))
    sa, sb = torch.load(full / "model.pt")["model"], torch.load(part / "model.pt")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_resume_refuses_a_different_config(tmp_path):
    train(small_cfg(tmp_path, epochs=1))
    record = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"different config \(batch_size: 64 -> 32\)"):
        train(small_cfg(tmp_path, epochs=2, batch_size=32))
    assert (tmp_path / "config.yaml").read_text() == record, "a refused resume rewrote the run's record"


def test_speed_options_change_the_layout_not_the_result(tmp_path):
    """channels_last (and the speed block in general) may change between a run and its resume, and the same
    seeded step gives the same weights up to float rounding."""
    from training.config import SpeedConfig

    a = train(small_cfg(tmp_path / "a", epochs=1, max_steps_per_epoch=3, speed=SpeedConfig(precision="fp32",
                                                                                          channels_last=False)))
    b = train(small_cfg(tmp_path / "b", epochs=1, max_steps_per_epoch=3, speed=SpeedConfig(precision="fp32",
                                                                                          channels_last=True)))
    sa, sb = torch.load(a / "model.pt")["model"], torch.load(b / "model.pt")["model"]
    for k in sa:
        assert sb[k].is_contiguous(), "checkpoints hold plain contiguous tensors"
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    train(small_cfg(tmp_path / "b", epochs=2, max_steps_per_epoch=3, speed=SpeedConfig(precision="bf16")))


def test_auto_precision_follows_the_hardware():
    from training.device import autocast_dtype, bf16_native

    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if bf16_native(cpu) else None)


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = small_cfg(tmp_path, data=DataConfig(name="fashion-mnist", root=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        train(cfg)


def test_unknown_method_rejected_before_training():
    with pytest.raises(ValueError, match="unknown training method"):
        TrainConfig(method=MethodConfig(name="nope"))


@pytest.mark.slow
def test_acceptance_two_epochs_clean_accuracy_and_pgd(fmnist_standard):
    """Foundation acceptance: 2 epochs of clean training reach >= 88 % test accuracy, and PGD-20 at eps 0.1
    drives the same model below 10 % (on a fixed 1,000-point subset)."""
    from serving.runtime.attacks import build_attack
    from serving.runtime.spec import ThreatModel
    from training.data import load_dataset
    from training.trainer import clean_accuracy, fixed_subset

    model, spec, ckpt = load_model(fmnist_standard / "model.pt")
    test = load_dataset("fashion-mnist", "test")
    acc = clean_accuracy(model, test, torch.device("cpu"))
    assert acc >= 0.88, acc
    assert abs(acc - ckpt["metrics"]["test_acc"]) < 1e-9
    x, y = test.get(fixed_subset(len(test), 1000, 0))
    attack = build_attack("pgd", model, ThreatModel(eps=0.1, step=0.025), steps=20, seed=0)
    robust = sum((model(attack(x[i:i + 250], y[i:i + 250])).argmax(1) == y[i:i + 250]).sum().item()
                 for i in range(0, 1000, 250)) / 1000
    assert robust < 0.10, robust
