"""The robust-classifiers bench: fair budgets, paired outcomes, the significance rule, its rendered section."""
from __future__ import annotations

import json

import numpy as np
import pytest

from serving.configio import ConfigError, load_config
from training.bench.robust_classifiers import (BenchConfig, epochs_consumed, op_count_ratio, run, runs_of,
                                               train_config)


def test_equal_total_budget_and_same_start():
    cfg = BenchConfig(epochs=5, teacher_epochs=2)
    runs = {r: train_config(cfg, 1, r) for r in runs_of(cfg)}
    assert runs["standard"].epochs == 2 and runs["standard"].method.name == "standard"
    assert runs["pgd-at"].epochs == runs["trades"].epochs == 5 and runs["pgd-at"].init_from is None
    student = runs["agkd-bml"]
    assert student.epochs == 3 and student.method.options["init_from_teacher"] is True
    assert student.method.options["teacher"].endswith("seed-1/standard/model.pt")
    for ft in ("pgd-at-ft", "trades-ft"):
        assert runs[ft].epochs == 3 and runs[ft].init_from == student.method.options["teacher"]
    # every method consumes E epochs in all, the teacher's included
    assert {epochs_consumed(cfg, r) for r in runs if r != "standard"} == {5}
    shared = {str((r.batch_size, r.seed, r.data, r.model, r.optim, r.method.attack, r.method.attack_steps))
              for r in runs.values()}
    assert len(shared) == 1


def test_teacher_must_leave_the_student_epochs():
    with pytest.raises(ConfigError, match="teacher_epochs"):
        load_config(BenchConfig, None, ["epochs=2", "teacher_epochs=2"])


def test_sanity_line_lists_raised_flags_and_keeps_unchecked_ones_apart():
    from training.bench.robust_classifiers import sanity_line

    unchecked = "not checked (one eps: monotonicity needs two or more)"
    runs = {"pgd-at": {"seeds": {"0": {"sanity_flags": {"eps_monotone": unchecked, "more_steps": True,
                                                        "large_eps": False, "any_flag": True}}}},
            "standard": {"seeds": {"0": {"sanity_flags": {"eps_monotone": unchecked, "more_steps": False,
                                                          "large_eps": None, "any_flag": False}}}}}
    line = sanity_line(runs, 200)
    assert line.startswith("Sanity flags (SPEC.md section 3, first 200 points): pgd-at (seed 0): more_steps.")
    assert "standard (seed 0)" not in line and "eps_monotone" not in line.split(".")[0]
    assert line.endswith("Not checked, in every run: eps_monotone (one eps: monotonicity needs two or more).")
    none = sanity_line({"standard": runs["standard"]}, 200)
    assert "none raised" in none


def test_op_count_bound():
    assert op_count_ratio(10) == (6 * 10 + 12) / (3 * 10 + 3)  # ~2.18: two PGD runs dominate
    assert 2.0 < op_count_ratio(5) < 2.5


@pytest.mark.slow
def test_bench_end_to_end_at_a_tiny_budget(tmp_path):
    """Two seeds of every run at a few optimiser steps: paired per-point outcomes, McNemar and bootstrap figures
    consistent with the per-seed accuracies, and a section that renders from the JSON."""
    from training.bench.report import stale_sections
    from training.evaluation.significance import decode_mask

    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n")
    cfg = load_config(BenchConfig, None, [
        f"out_dir={tmp_path / 'work'}", f"results={tmp_path / 'results' / 'robust_classifiers.json'}",
        f"benchmarks_md={md}", "seeds=[0, 1]", "epochs=2", "teacher_epochs=1", "max_steps_per_epoch=1",
        "data.train_subset=256", "eval_subset=64", "eval_batch_size=64", "sanity_checks=false", "n_boot=200",
        "eval_attacks=[{name: fgsm, steps: 1}, {name: pgd, steps: 3}]", "device=cpu", "num_threads=1"])
    assert run(cfg) == 0
    summary = json.loads((tmp_path / "results" / "robust_classifiers.json").read_text())
    assert set(summary["protocols"]) == {"equal-total", "same-start"}
    ev = json.loads((tmp_path / "work" / "seed-1" / "agkd-bml" / "evaluation.json").read_text())
    worst = decode_mask(ev["results"][0]["worst_case_points"], ev["n"])
    assert worst.sum() / ev["n"] == pytest.approx(ev["results"][0]["worst_case"])
    assert not (worst & ~decode_mask(ev["clean_points"], ev["n"])).any(), "robust but not clean"
    c = summary["protocols"]["same-start"]["comparisons"]["agkd-bml"]["pgd-at-ft"]
    per_seed = [summary["runs"]["agkd-bml"]["seeds"][s]["worst_case"] - summary["runs"]["pgd-at-ft"]["seeds"][s][
        "worst_case"] for s in ("0", "1")]
    assert c["worst_case_diff"] == pytest.approx(np.mean(per_seed))
    for s, m in c["mcnemar_per_seed"].items():
        assert (m["a_only"] - m["b_only"]) / 64 == pytest.approx(per_seed[int(s)])
    assert c["verdict"] in ("met", "not shown")
    assert stale_sections(md, tmp_path / "results") == []
    assert "equal-total" in md.read_text() and "McNemar" in md.read_text()
