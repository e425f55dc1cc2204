"""BENCHMARKS.md is generated: every figure table in it equals what its results JSON renders now."""
import json
from pathlib import Path

import pytest

from training.bench import report

REPO = Path(__file__).resolve().parents[3]


def test_every_generated_section_of_benchmarks_md_matches_its_json(monkeypatch):
    monkeypatch.chdir(REPO)
    assert report.stale_sections() == [], "rerun: robustserve bench render"


def test_render_into_replaces_only_its_own_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    row = {"seconds_per_step": 0.2, "steps_per_second": 5.0, "speedup": 1.0, "batch_size": 128,
           "images_per_second": 640.0, "autocast": None, "channels_last": False, "arch": "smallcnn",
           "attack_steps": 10}
    result = {"suite": "train-speed", "command": "robustserve bench train-speed", "modes": {"fp32-eager": {}},
              "rows": {"pgd-at": {"fp32-eager": row}},
              "apgd_cache": {"steps": 10, "batch": 8, "seconds_cached": 1.0, "seconds_uncached": 2.0, "speedup": 2.0,
                             "forward_passes": {"cached": 11, "uncached": 22}},
              "machine": {"platform": "p", "torch": "t", "threads": 2, "device": "cpu", "bf16_native": False},
              "config": {"rounds": 1, "steps_per_round": 1, "train_subset": 256}}
    (results / "train_speed.json").write_text(json.dumps(result))
    (results / "train_speed_gpu.json").write_text(json.dumps({**result, "command": "on a GPU"}))
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n## Analysis\n\nhand-written prose\n")
    report.render_into("train_speed", md, results)
    report.render_into("train_speed_gpu", md, results)
    assert report.generated_stems(md) == ["train_speed", "train_speed_gpu"]
    assert "[train_speed_gpu]" in md.read_text() and "hand-written prose" in md.read_text()
    assert report.stale_sections(md, results) == []
    row["seconds_per_step"] = 0.1
    (results / "train_speed.json").write_text(json.dumps(result))
    assert report.stale_sections(md, results) == ["train_speed"]
    before = md.read_text()
    report.render_into("train_speed", md, results)
    after = md.read_text()
    assert report.stale_sections(md, results) == [] and "0.100" in after
    # the other variant's section is untouched
    tail = before[before.index("<!-- generated: " + (results / "train_speed_gpu.json").as_posix()):]
    assert tail in after


def test_unknown_suite_is_named():
    with pytest.raises(ValueError, match="no renderer for suite 'nope'"):
        report.renderer("nope")


@pytest.mark.slow
def test_train_speed_bench_runs_and_renders(tmp_path):
    """The speed bench end to end at a tiny budget: every variant timed, the cache figure, the robustness check."""
    from serving.configio import load_config
    from training.bench.train_speed import BenchConfig, run

    md = tmp_path / "B.md"
    cfg = load_config(BenchConfig, None, [
        "methods=[pgd-at]", "rounds=1", "steps_per_round=1", "warmup_steps=0", "train_subset=256",
        "attack_steps=1", "apgd_steps=2", "apgd_batch=8", "check_steps=2", "check_points=100", "num_threads=1",
        "batch_lever=[pgd-at]", "compile_lever=[]", "breakdown_steps=1",
        f"results={tmp_path / 'train_speed.json'}", f"benchmarks_md={md}"])
    assert run(cfg) == 0
    result = json.loads((tmp_path / "train_speed.json").read_text())
    row = result["rows"]["pgd-at"]
    assert row["fp32-eager"]["speedup"] == 1.0 and row["fast"]["channels_last"] is True
    assert row["fp32-eager"]["channels_last"] is False and row["fp32-eager"]["autocast"] is None
    assert result["apgd_cache"]["forward_passes"] == {"cached": 3, "uncached": 6}
    # the op timer saw the convolutions and the rest. SmallCNN's conv flops at batch 128, one attack step: the
    # attack's forward and input gradient, then the update's forward, weight gradients and input gradients of every
    # layer but the first (the image needs none there): 5 forward passes' worth less the first layer's
    ops = row["fast"]["op_seconds_per_step"]
    assert ops["conv"] > 0 and ops["other"] > 0
    first = 2 * 128 * 26 * 26 * 32 * 9
    fwd = first + 2 * 128 * (24 * 24 * 32 * 288 + 10 * 10 * 64 * 288 + 8 * 8 * 64 * 576)
    assert ops["conv_flops"] == row["fp32-eager"]["op_seconds_per_step"]["conv_flops"] == 5 * fwd - first
    assert row["fast-batch2x"]["batch_size"] == 256 and "fast-compiled" not in row
    assert result["gemm"]["bf16_gflops"] > 0
    assert set(result["robustness_check"]) == {"fp32-eager", "fast"}
    assert "within_reference_ci" in result["robustness_check"]["fast"]
    assert report.stale_sections(md, tmp_path) == []
