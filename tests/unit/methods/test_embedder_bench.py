"""``robustserve bench robust-embedders`` end to end at a tiny budget: training, the rob28 ranking attacks, ERS with
its per-term standard errors, and the BENCHMARKS.md section rendered from the results JSON."""
import json

import numpy as np
import pytest

from serving.configio import load_config


@pytest.mark.slow
def test_embedder_bench_end_to_end_at_a_tiny_budget(tmp_path):
    from training.bench.report import stale_sections
    from training.bench.robust_embedders import BenchConfig, run

    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n")
    results = tmp_path / "results" / "robust_embedders.json"
    cfg = load_config(BenchConfig, None, [
        f"out_dir={tmp_path / 'work'}", f"results={results}", f"benchmarks_md={md}", "variants=[hm-ics]",
        "epochs=1", "steps_per_epoch=1", "attack_steps=2", "queries=8", "device=cpu", "num_threads=1"])
    assert run(cfg) == 0
    out = json.loads(results.read_text())
    v = out["variants"]["hm-ics"]
    terms = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")
    assert set(v["terms"]) == set(terms) == set(v["terms_se"]) == set(v["attacks"])
    assert v["ERS"] == pytest.approx(np.mean([v["terms"][t] for t in terms]))
    assert all(se >= 0 for se in v["terms_se"].values()) and v["ERS_se"] >= 0
    assert 0 <= v["benign"]["R@1"] <= 100 and v["pgd_steps_per_batch"] <= 2
    assert out["points"] and out["config"]["queries"] == 8
    assert stale_sections(md, results.parent) == []
    text = md.read_text()
    assert "hm-ics" in text and "Standard error of each ERS term" in text
