"""``robustserve bench robust-classifiers``: standard, PGD-AT, TRADES and AGKD-BML trained under one budget
(same data, architecture, epochs, batch, optimiser, seed and training threat model), then the same attack
cascade on the same fixed test points. Writes a JSON report under ``benchmarks/results/`` and its section of
``BENCHMARKS.md``.

Resumable: training continues from each run's ``last.pt``; a variant whose ``evaluation.json`` exists is not
evaluated again. The defaults are a CPU budget (about an hour on 2 cores); ``configs/classifiers/bench-full.yaml``
holds the full protocol for a GPU.
"""
from __future__ import annotations

import json
import logging
import platform
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field

from serving.runtime.spec import Frozen, ThreatModel
from training.config import AttackSpec, DataConfig, EvaluateConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig

log = logging.getLogger(__name__)

SECTION = "## Robust classifiers (Fashion-MNIST)"

# name -> (registered method, options). The two ablations keep CE + MART and drop one of AGKD-BML's parts.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "pgd-at": ("pgd-at", {}),
    "trades": ("trades", {}),
    "agkd-bml": ("agkd-bml", {}),
    "agkd-bml-at-only": ("agkd-bml", {"w_bml": 0.0}),
    "agkd-bml-bml-only": ("agkd-bml", {"w_at": 0.0}),
    # A diagnostic, not part of the method: the published label smoothing 0.5 switched off.
    "agkd-bml-no-ls": ("agkd-bml", {"label_smoothing": 0.0}),
}

CPU_SUITE = (
    AttackSpec(name="fgsm", steps=1),
    AttackSpec(name="pgd", steps=20),
    AttackSpec(name="cw", steps=20),
    AttackSpec(name="apgd-ce", steps=50),
    AttackSpec(name="apgd-t", steps=10),  # x 9 target classes: 90 gradient steps per surviving point
)


class BenchConfig(Frozen):
    """Defaults: the CPU budget. The full protocol (GPU) is in configs/classifiers/bench-full.yaml."""

    out_dir: str = "benchmarks/work/robust-classifiers"
    results: str = "benchmarks/results/robust_classifiers.json"
    benchmarks_md: str = "BENCHMARKS.md"
    # Run in this order: the teacher first, then the pair the goal compares most directly.
    variants: tuple[str, ...] = ("standard", "pgd-at", "agkd-bml", "trades")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-variant overrides
    # Training budget, shared by every variant.
    data: DataConfig = DataConfig(train_subset=12800)  # 100 batches of 128 per epoch
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig(lr=0.05, schedule="cosine", weight_decay=5e-4)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)  # smoke runs only
    # 5 steps of 0.025 (not the methods' default 10 of 0.01) halve every robust method's cost, which buys twice
    # the SGD steps in the CPU hour; 5 x 0.025 still crosses the ball 1.25 times from its random start.
    attack: ThreatModel = ThreatModel(norm="linf", eps=0.1, step=0.025)
    attack_steps: int = Field(5, ge=1)
    seed: int = 0
    # Evaluation, identical for every variant.
    eval_eps: float = 0.1
    eval_subset: Optional[int] = Field(2000, ge=1)  # None: the full test set; reported runs use >= 2,000
    eval_attacks: tuple[AttackSpec, ...] = CPU_SUITE
    curve_eps: tuple[float, ...] = ()
    eval_batch_size: int = Field(500, ge=1)
    sanity_checks: bool = True
    sanity_points: int = Field(200, ge=32)  # the gradient-masking checks run PGD-100 on these points
    device: str = "auto"
    num_threads: Optional[int] = None
    command: str = "robustserve bench robust-classifiers"  # recorded beside the table


def train_config(cfg: BenchConfig, variant: str) -> TrainConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    method, options = VARIANTS[variant]
    options = {**options, **cfg.method_options.get(variant, {})}
    if method == "agkd-bml":
        options.setdefault("teacher", str(Path(cfg.out_dir) / "standard" / "model.pt"))
    return TrainConfig(
        data=cfg.data, model=cfg.model, optim=cfg.optim, epochs=cfg.epochs, batch_size=cfg.batch_size,
        max_steps_per_epoch=cfg.max_steps_per_epoch, seed=cfg.seed, device=cfg.device, num_threads=cfg.num_threads,
        out_dir=str(Path(cfg.out_dir) / variant),
        method=MethodConfig(name=method, options=options, attack=cfg.attack, attack_steps=cfg.attack_steps),
    )


def eval_config(cfg: BenchConfig, variant: str) -> EvaluateConfig:
    run = Path(cfg.out_dir) / variant
    return EvaluateConfig(
        checkpoint=str(run / "model.pt"), data=cfg.data.model_copy(update={"augment": False, "train_subset": None}),
        attacks=cfg.eval_attacks, eps=(cfg.eval_eps,), curve_eps=cfg.curve_eps, subset=cfg.eval_subset,
        batch_size=cfg.eval_batch_size, seed=cfg.seed, device=cfg.device, out_dir=str(run),
        sanity_checks=False, num_threads=cfg.num_threads,  # run by add_sanity on sanity_points points
    )


def add_sanity(cfg: BenchConfig, variant: str) -> None:
    """The gradient-masking checks of SPEC.md section 3 on the first ``sanity_points`` evaluation points, stored
    in the variant's evaluation.json."""
    from training.checkpoint import load_model
    from training.device import resolve_device
    from training.evaluation.classification import sanity_checks
    from training.evaluation.run import load_eval_points

    ecfg = eval_config(cfg, variant)
    path = Path(ecfg.out_dir) / "evaluation.json"
    report = json.loads(path.read_text())
    device = resolve_device(cfg.device)
    model, _, _ = load_model(ecfg.checkpoint, map_location=device)
    x, y, _ = load_eval_points(ecfg, device)
    curve = {r["eps"]: r["worst_case"] for r in report["results"]}
    report["sanity"] = sanity_checks(model.to(device), x, y, cfg.eval_eps, curve, cfg.seed, cfg.eval_batch_size,
                                     norm=cfg.eval_attacks[0].norm, n=cfg.sanity_points)
    report["sanity_points"] = min(cfg.sanity_points, len(x))
    path.write_text(json.dumps(report, indent=2))


def op_count_ratio(steps: int) -> float:
    """AGKD-BML / PGD-AT cost per batch in forward-pass units (a backward ~ 2 forwards).

    PGD-AT: k attack steps on B + one training pass on B = 3k + 3. AGKD-BML: k steps on 2B + a clean forward on
    B (most-confusing class) + a training pass on 3B + a teacher forward on 2B = 6k + 1 + 9 + 2.
    """
    return (6 * steps + 12) / (3 * steps + 3)


def epoch_seconds(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip()]


def summarise(cfg: BenchConfig, reports: dict[str, dict]) -> dict:
    rows = {}
    for variant, rep in reports.items():
        row = next(r for r in rep["results"] if r["eps"] == cfg.eval_eps)
        secs = epoch_seconds(Path(cfg.out_dir) / variant)
        rows[variant] = {
            "method": VARIANTS[variant][0],
            "clean": rep["clean_accuracy"],
            "attacks": row["attacks"],
            "worst_case": row["worst_case"],
            "worst_case_ci95": row["worst_case_ci95"],
            "train_seconds_per_epoch": sum(secs) / len(secs) if secs else None,
            "train_seconds_total": sum(secs) if secs else None,
            "eval_seconds": rep.get("seconds"),
            "sanity_flags": {k: v["flag"] for k, v in rep.get("sanity", {}).items() if isinstance(v, dict)},
            "sanity": rep.get("sanity"),
        }
    cost = {}
    if "agkd-bml" in rows and "pgd-at" in rows and rows["pgd-at"]["train_seconds_per_epoch"]:
        a, p = rows["agkd-bml"]["train_seconds_per_epoch"], rows["pgd-at"]["train_seconds_per_epoch"]
        cost = {"agkd_bml_over_pgd_at": a / p, "op_count_bound": op_count_ratio(cfg.attack_steps)}
        if "standard" in rows and rows["standard"]["train_seconds_total"]:
            # The teacher is a full standard run that AGKD-BML cannot do without.
            teacher = rows["standard"]["train_seconds_total"]
            cost["agkd_bml_with_teacher_over_pgd_at"] = (rows["agkd-bml"]["train_seconds_total"] + teacher) / \
                rows["pgd-at"]["train_seconds_total"]
    goal = {}  # per AGKD-BML variant: worst case above both baselines', clean accuracy within 1 point
    if {"pgd-at", "trades"} <= set(rows):
        base = [rows["pgd-at"], rows["trades"]]
        for name, r in rows.items():
            if r["method"] != "agkd-bml":
                continue
            margin = r["worst_case"] - max(b["worst_case"] for b in base)
            gap = r["clean"] - max(b["clean"] for b in base)  # negative: less accurate than the best baseline
            goal[name] = {"met": margin > 0 and gap >= -0.01, "worst_case_margin": margin, "clean_gap": gap}
    first = next(iter(reports.values()))
    return {
        "suite": "robust-classifiers",
        "command": cfg.command,
        "dataset": cfg.data.name,
        "points": first.get("points"),
        "n": first["n"],
        "eps": cfg.eval_eps,
        "budget": {"arch": cfg.model.arch, "train_subset": cfg.data.train_subset, "epochs": cfg.epochs,
                   "batch_size": cfg.batch_size, "optim": cfg.optim.model_dump(mode="json"),
                   "attack": cfg.attack.model_dump(mode="json"), "attack_steps": cfg.attack_steps, "seed": cfg.seed},
        "attacks": [a.model_dump(mode="json") for a in cfg.eval_attacks],
        "sanity_points": first.get("sanity_points", 500),
        "rows": rows,
        "cost": cost,
        "goal": goal,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "config": cfg.model_dump(mode="json"),
    }


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    names = list(next(iter(rows.values()))["attacks"]) if rows else []
    b = summary["budget"]
    subset = "all 60,000" if b["train_subset"] is None else f"{b['train_subset']:,} (fixed seeded subset)"
    lines = [
        SECTION, "",
        f"Command: `{summary['command']}` (results: `{summary['config']['results']}`).",
        "",
        f"Budget, identical for every method: {b['arch']}, {subset} training images, {b['epochs']} epoch(s), "
        f"batch {b['batch_size']}, {b['optim']['name'].upper()} lr {b['optim']['lr']} {b['optim']['schedule']}, "
        f"seed {b['seed']}; training attacks L-inf eps {b['attack']['eps']:g}, {b['attack_steps']} steps of "
        f"{b['attack']['step']:g}. AGKD-BML's teacher is the `standard` row's model.",
        f"Evaluation: {summary['points']} ({summary['n']:,} points) of the Fashion-MNIST test set, L-inf eps "
        f"{summary['eps']:g}, attacks run as a cascade (each only on points still robust), so each attack column is "
        f"the accuracy after it and the last is the worst case per point. APGD-T tries 9 target classes. Sanity "
        f"flags (SPEC.md section 3) on the first {summary['sanity_points']} points.",
        "",
        "| method | clean | " + " | ".join(names) + " | worst case (95 % CI) | train s/epoch | sanity flags |",
        "|---" * (len(names) + 5) + "|",
    ]
    for name, r in rows.items():
        lo, hi = r["worst_case_ci95"]
        flags = [k for k, v in r["sanity_flags"].items() if v and k != "any_flag"]
        cells = [name, f"{100 * r['clean']:.2f}"] + [f"{100 * r['attacks'][k]:.2f}" for k in names]
        cells += [f"**{100 * r['worst_case']:.2f}** ({100 * lo:.1f}-{100 * hi:.1f})",
                  f"{r['train_seconds_per_epoch']:.0f}" if r["train_seconds_per_epoch"] else "-",
                  ", ".join(flags) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    extra = [name for name in rows if VARIANTS[name][1]]
    if extra:
        lines += ["", "Variants: " + "; ".join(
            f"`{name}` = {VARIANTS[name][0]} with {', '.join(f'{k} {v:g}' for k, v in VARIANTS[name][1].items())}"
            for name in extra) + "."]
    goal = summary.get("goal")
    if goal:
        lines += ["", "Goal (worst case above both PGD-AT's and TRADES', clean accuracy within 1 point of the better "
                      "of them): " + "; ".join(
                          f"`{name}` **{'met' if g['met'] else 'not met'}** (worst case "
                          f"{100 * g['worst_case_margin']:+.2f} points, clean {100 * g['clean_gap']:+.2f})"
                          for name, g in goal.items()) + "."]
    c = summary.get("cost") or {}
    if c:
        lines += ["", f"Training cost AGKD-BML / PGD-AT per epoch: **{c['agkd_bml_over_pgd_at']:.2f}x** measured, "
                      f"{c['op_count_bound']:.2f}x by op count (forward = 1, backward = 2); "
                      f"{c.get('agkd_bml_with_teacher_over_pgd_at', float('nan')):.2f}x in total when the teacher's "
                      "standard training is counted. Seconds were measured while other jobs shared the machine's "
                      "cores, so the op-count bound is the load-independent figure."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def run(cfg: BenchConfig) -> int:
    from training.evaluation.run import evaluate
    from training.trainer import train

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    variants = list(cfg.variants)
    if any(VARIANTS.get(v, ("",))[0] == "agkd-bml" for v in variants) and "standard" not in variants:
        variants.insert(0, "standard")  # the teacher
    for v in variants:
        train_config(cfg, v)  # validate every variant before hours of work
    reports: dict[str, dict] = {}
    for v in variants:
        run_dir = Path(cfg.out_dir) / v
        report_path = run_dir / "evaluation.json"
        if not report_path.is_file():
            t0 = time.perf_counter()
            train(train_config(cfg, v))
            log.info("%s trained in %.0f s", v, time.perf_counter() - t0)
            evaluate(eval_config(cfg, v))
        if cfg.sanity_checks and "sanity" not in json.loads(report_path.read_text()):
            add_sanity(cfg, v)
        reports[v] = json.loads(report_path.read_text())
        log.info("%s: clean %.4f worst %.4f", v, reports[v]["clean_accuracy"],
                 next(r for r in reports[v]["results"] if r["eps"] == cfg.eval_eps)["worst_case"])
    summary = summarise(cfg, reports)
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2))
    section = markdown(summary)
    write_section(Path(cfg.benchmarks_md), section)
    print(section)
    return 0
