"""The robust-classifiers bench: its section of BENCHMARKS.md is replaced in place, others are left alone."""
from __future__ import annotations

from training.bench.robust_classifiers import SECTION, BenchConfig, op_count_ratio, train_config, write_section


def test_write_section_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nintro\n\n{SECTION}\n\nold table\n\n## Robust embedders\n\nkeep me\n")
    write_section(md, f"{SECTION}\n\nnew table\n")
    text = md.read_text()
    assert "new table" in text and "old table" not in text
    assert text.index("intro") < text.index("new table") < text.index("## Robust embedders") < text.index("keep me")
    write_section(md, f"{SECTION}\n\nnewer\n")
    assert md.read_text().count(SECTION) == 1


def test_every_variant_shares_the_budget_and_agkd_uses_the_standard_run_as_teacher():
    cfg = BenchConfig()
    runs = {v: train_config(cfg, v) for v in ("standard", "pgd-at", "trades", "agkd-bml", "agkd-bml-at-only")}
    shared = {str((r.epochs, r.batch_size, r.seed, r.data, r.model, r.optim, r.method.attack,
                   r.method.attack_steps)) for r in runs.values()}
    assert len(shared) == 1
    assert runs["agkd-bml"].method.options["teacher"].endswith("standard/model.pt")
    assert runs["agkd-bml-at-only"].method.options["w_bml"] == 0.0


def test_op_count_bound():
    assert op_count_ratio(10) == (6 * 10 + 12) / (3 * 10 + 3)  # ~2.18: two PGD runs dominate
    assert 2.0 < op_count_ratio(5) < 2.5
