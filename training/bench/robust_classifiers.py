"""``robustserve bench robust-classifiers``: AGKD-BML against PGD-AT and TRADES under two fair protocols, several
seeds, the same attack cascade on the same test points, and a paired significance test.

Protocols (both reported):
  equal-total  every method consumes E epochs in all: PGD-AT and TRADES train E epochs from scratch; AGKD-BML's
               teacher (``standard``) trains T epochs and its student E - T epochs from the teacher's weights.
  same-start   PGD-AT and TRADES are fine-tuned from the same ``standard`` model as AGKD-BML's student, for the same
               E - T epochs.
Every run of seed s uses training seed s; the evaluation points and attack seeds are the same for every run, so
outcomes pair point by point. A verdict "met" needs AGKD-BML's pooled worst case higher than the baseline's with a
one-sided paired-bootstrap p < 0.05 (points resampled, seeds kept together) and its clean accuracy within 1 point;
per-seed exact McNemar p-values are reported beside it.

Resumable: training continues from each run's ``last.pt``; a run whose ``evaluation.json`` exists is not evaluated
again. Writes ``results`` (JSON); its BENCHMARKS.md section is rendered from it (``robustserve bench render``).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from serving.runtime.evaluation.classification import flag_summary
from serving.runtime.spec import Frozen, ThreatModel
from training.config import AttackSpec, DataConfig, EvaluateConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig

log = logging.getLogger(__name__)

# AGKD-BML's recipe at these budgets: the published loss, weights and constants, with label smoothing and MART's
# weight each rising linearly from 0 over the first student epoch. With the published constants from the first
# step, a student initialised from a clean teacher collapses to a constant prediction (10 % clean) within ~20
# steps: MART's terms are lowest there while the adversarial examples are confidently wrong, and 0.5-smoothed
# targets leave CE little pull away from it (see AGKDBMLOptions.mart_ramp_epochs; the agkd-bml-published ablation
# measures it).
AGKD_RECIPE: dict[str, Any] = {"label_smoothing_ramp_epochs": 1.0, "mart_ramp_epochs": 1.0}

# name -> (registered method, options). The ablations change one thing of the bench's AGKD-BML recipe.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "pgd-at": ("pgd-at", {}),
    "trades": ("trades", {}),
    "agkd-bml": ("agkd-bml", AGKD_RECIPE),
    "agkd-bml-at-only": ("agkd-bml", {**AGKD_RECIPE, "w_bml": 0.0}),
    "agkd-bml-bml-only": ("agkd-bml", {**AGKD_RECIPE, "w_at": 0.0}),
    # The published constants from the first step (no ramps).
    "agkd-bml-published": ("agkd-bml", {}),
    # One ramp only.
    "agkd-bml-ls-ramp": ("agkd-bml", {"label_smoothing_ramp_epochs": 1.0}),
    "agkd-bml-mart-ramp": ("agkd-bml", {"mart_ramp_epochs": 1.0}),
    # A diagnostic, not part of the method: the published label smoothing 0.5 switched off.
    "agkd-bml-no-ls": ("agkd-bml", {**AGKD_RECIPE, "label_smoothing": 0.0}),
}
BASELINES = ("pgd-at", "trades")
PROTOCOLS = ("equal-total", "same-start")

# The benchmark suite: AutoAttack's budgets for APGD (100 steps; APGD-T: 100 steps for each of 9 target classes).
BENCH_SUITE = (
    AttackSpec(name="fgsm", steps=1),
    AttackSpec(name="pgd", steps=20),
    AttackSpec(name="cw", steps=20),
    AttackSpec(name="apgd-ce", steps=100),
    AttackSpec(name="apgd-t", steps=100),
)


class BenchConfig(Frozen):
    """Defaults: the stated protocol on the full test set; ``epochs``/``data.train_subset`` set the training budget."""

    out_dir: str = "benchmarks/work/robust-classifiers"
    results: str = "benchmarks/results/robust_classifiers.json"
    benchmarks_md: str = "BENCHMARKS.md"
    seeds: tuple[int, ...] = (0, 1, 2)
    protocols: tuple[Literal["equal-total", "same-start"], ...] = PROTOCOLS
    ablations: tuple[str, ...] = ()  # more AGKD-BML variants (same budget as agkd-bml), e.g. agkd-bml-at-only
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-variant overrides
    # Training budget. epochs: what every method consumes in all (AGKD-BML: teacher + student).
    data: DataConfig = DataConfig(train_subset=12800)  # 100 batches of 128 per epoch
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig(lr=0.05, schedule="cosine", weight_decay=5e-4)
    epochs: int = Field(3, ge=2)
    teacher_epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)  # smoke runs only
    # 5 steps of 0.025 (not the methods' default 10 of 0.01) halve every robust method's cost; 5 x 0.025 still
    # crosses the ball 1.25 times from its random start.
    attack: ThreatModel = ThreatModel(norm="linf", eps=0.1, step=0.025)
    attack_steps: int = Field(5, ge=1)
    # Evaluation, identical for every run: the same points and attack seeds.
    eval_eps: float = 0.1
    eval_subset: Optional[int] = Field(None, ge=1)  # None: the full 10,000-point test set
    eval_seed: int = 0
    eval_attacks: tuple[AttackSpec, ...] = BENCH_SUITE
    curve_eps: tuple[float, ...] = ()
    eval_batch_size: int = Field(500, ge=1)
    sanity_checks: bool = True
    sanity_points: int = Field(200, ge=32)  # the gradient-masking checks run PGD-100 on these points
    n_boot: int = Field(10_000, ge=100)
    device: str = "auto"
    num_threads: Optional[int] = None
    command: str = "robustserve bench robust-classifiers"  # recorded beside the table

    @model_validator(mode="after")
    def _budget(self) -> "BenchConfig":
        if self.teacher_epochs >= self.epochs:
            raise ValueError(f"teacher_epochs ({self.teacher_epochs}) must be below epochs ({self.epochs}): the "
                             "student needs epochs of its own within the equal total budget")
        for v in self.ablations:
            if VARIANTS.get(v, ("",))[0] != "agkd-bml":
                raise ValueError(f"ablation {v!r} is not an AGKD-BML variant; choose from "
                                 f"{', '.join(k for k, m in VARIANTS.items() if m[0] == 'agkd-bml')}")
        return self


def runs_of(cfg: BenchConfig) -> list[str]:
    """The run names of one seed, the teacher first."""
    names = ["standard", "agkd-bml", *cfg.ablations]
    if "equal-total" in cfg.protocols:
        names += list(BASELINES)
    if "same-start" in cfg.protocols:
        names += [f"{b}-ft" for b in BASELINES]
    return names


def run_dir(cfg: BenchConfig, seed: int, run: str) -> Path:
    return Path(cfg.out_dir) / f"seed-{seed}" / run


def train_config(cfg: BenchConfig, seed: int, run: str) -> TrainConfig:
    variant = run[:-3] if run.endswith("-ft") else run
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    method, options = VARIANTS[variant]
    options = {**options, **cfg.method_options.get(variant, {})}
    teacher = run_dir(cfg, seed, "standard") / "model.pt"
    init_from = None
    if method == "standard":
        epochs = cfg.teacher_epochs
    elif method == "agkd-bml":
        options.setdefault("teacher", str(teacher))
        options["init_from_teacher"] = True
        epochs = cfg.epochs - cfg.teacher_epochs
    elif run.endswith("-ft"):
        init_from, epochs = str(teacher), cfg.epochs - cfg.teacher_epochs
    else:
        epochs = cfg.epochs
    return TrainConfig(
        data=cfg.data, model=cfg.model, optim=cfg.optim, epochs=epochs, batch_size=cfg.batch_size,
        max_steps_per_epoch=cfg.max_steps_per_epoch, seed=seed, device=cfg.device, num_threads=cfg.num_threads,
        out_dir=str(run_dir(cfg, seed, run)), init_from=init_from,
        method=MethodConfig(name=method, options=options, attack=cfg.attack, attack_steps=cfg.attack_steps),
    )


def epochs_consumed(cfg: BenchConfig, run: str) -> int:
    """Every epoch the run's model consumed, its starting point's included: the teacher's T, every other run's E
    (from scratch; or T of the teacher + E - T of the student or the fine-tuning)."""
    return cfg.teacher_epochs if run == "standard" else cfg.epochs


def eval_config(cfg: BenchConfig, seed: int, run: str) -> EvaluateConfig:
    d = run_dir(cfg, seed, run)
    return EvaluateConfig(
        checkpoint=str(d / "model.pt"), data=cfg.data.model_copy(update={"augment": False, "train_subset": None}),
        attacks=cfg.eval_attacks, eps=(cfg.eval_eps,), curve_eps=cfg.curve_eps, subset=cfg.eval_subset,
        batch_size=cfg.eval_batch_size, seed=cfg.eval_seed, device=cfg.device, out_dir=str(d),
        sanity_checks=False, num_threads=cfg.num_threads,  # run by add_sanity on sanity_points points
    )


def add_sanity(cfg: BenchConfig, seed: int, run: str) -> None:
    """The gradient-masking checks of SPEC.md section 3 on the first ``sanity_points`` evaluation points, stored
    in the run's evaluation.json."""
    from training.checkpoint import load_model
    from training.device import resolve_device
    from training.evaluation.classifier_report import sanity_checks
    from training.evaluation.run import load_eval_points

    ecfg = eval_config(cfg, seed, run)
    path = Path(ecfg.out_dir) / "evaluation.json"
    report = json.loads(path.read_text())
    device = resolve_device(cfg.device)
    model, _, _ = load_model(ecfg.checkpoint, map_location=device)
    x, y, _ = load_eval_points(ecfg, device)
    curve = {r["eps"]: r["worst_case"] for r in report["results"]}
    report["sanity"] = sanity_checks(model.to(device), x, y, cfg.eval_eps, curve, cfg.eval_seed, cfg.eval_batch_size,
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


def _row(rep: dict, eps: float) -> dict:
    return next(r for r in rep["results"] if r["eps"] == eps)


def _outcomes(reports: dict[int, dict[str, dict]], run: str, eps: float, key: str) -> np.ndarray:
    """Per-point outcomes [seeds, N] of ``run``: ``key`` 'clean' or 'worst_case'."""
    from training.evaluation.significance import decode_mask

    rows = []
    for seed in sorted(reports):
        rep = reports[seed][run]
        hexed = rep["clean_points"] if key == "clean" else _row(rep, eps)["worst_case_points"]
        rows.append(decode_mask(hexed, rep["n"]))
    return np.stack(rows)


def compare(cfg: BenchConfig, reports: dict[int, dict[str, dict]], method: str, baseline: str) -> dict:
    """``method`` vs ``baseline`` over all seeds: pooled paired bootstrap and per-seed McNemar on the worst case,
    the clean gap, and the verdict."""
    from training.evaluation.significance import mcnemar_exact, paired_bootstrap, verdict

    a, b = _outcomes(reports, method, cfg.eval_eps, "worst_case"), _outcomes(reports, baseline, cfg.eval_eps,
                                                                             "worst_case")
    boot = paired_bootstrap(a, b, n_boot=cfg.n_boot, seed=cfg.eval_seed)
    ca, cb = _outcomes(reports, method, cfg.eval_eps, "clean"), _outcomes(reports, baseline, cfg.eval_eps, "clean")
    clean_gap = float(ca.mean() - cb.mean())
    per_seed = {str(seed): mcnemar_exact(a[i], b[i]) for i, seed in enumerate(sorted(reports))}
    return {"baseline": baseline, "worst_case_diff": boot["diff"], "worst_case_diff_ci95": boot["ci95"],
            "p_one_sided": boot["p_one_sided"], "n_boot": boot["n_boot"], "clean_gap": clean_gap,
            "mcnemar_per_seed": per_seed, "verdict": verdict(boot["p_one_sided"], clean_gap)}


def summarise(cfg: BenchConfig, reports: dict[int, dict[str, dict]]) -> dict:
    from serving.runtime.evaluation.classification import wilson_interval

    runs = runs_of(cfg)
    per_run: dict[str, Any] = {}
    for run in runs:
        seeds = {}
        for seed in sorted(reports):
            rep = reports[seed][run]
            row = _row(rep, cfg.eval_eps)
            secs = epoch_seconds(run_dir(cfg, seed, run))
            seeds[str(seed)] = {
                "clean": rep["clean_accuracy"], "attacks": row["attacks"], "worst_case": row["worst_case"],
                "worst_case_ci95": row["worst_case_ci95"], "train_seconds": sum(secs) if secs else None,
                "eval_seconds": rep.get("seconds"),
                "sanity_flags": flag_summary(rep.get("sanity", {})),
            }
        n = next(iter(reports.values()))[run]["n"]
        k = int(round(sum(v["worst_case"] for v in seeds.values()) * n))
        total = n * len(seeds)
        names = list(next(iter(seeds.values()))["attacks"])
        per_run[run] = {
            "method": VARIANTS[run[:-3] if run.endswith("-ft") else run][0],
            "epochs_consumed": epochs_consumed(cfg, run),
            "start": "standard" if run.endswith("-ft") or VARIANTS.get(run, ("",))[0] == "agkd-bml" else "scratch",
            "seeds": seeds,
            "pooled": {
                "clean": float(np.mean([v["clean"] for v in seeds.values()])),
                "attacks": {a: float(np.mean([v["attacks"][a] for v in seeds.values()])) for a in names},
                "worst_case": k / total, "worst_case_ci95": wilson_interval(k, total),
                "worst_case_sd_over_seeds": float(np.std([v["worst_case"] for v in seeds.values()], ddof=1))
                if len(seeds) > 1 else None,
            },
        }
    protocols = {}
    for proto in cfg.protocols:
        baselines = list(BASELINES) if proto == "equal-total" else [f"{b}-ft" for b in BASELINES]
        agkd = ["agkd-bml", *cfg.ablations]
        comps = {m: {b: compare(cfg, reports, m, b) for b in baselines} for m in agkd}
        protocols[proto] = {
            "rows": baselines + agkd + (["standard"] if proto == "equal-total" else []),
            "comparisons": comps,
            "verdict": {m: "met" if all(c["verdict"] == "met" for c in comps[m].values()) else "not shown"
                        for m in agkd},
        }
    cost = {}
    first = str(min(reports))
    a, p = per_run["agkd-bml"]["seeds"][first]["train_seconds"], None
    if "pgd-at-ft" in per_run:
        p = per_run["pgd-at-ft"]["seeds"][first]["train_seconds"]
    if a and p:
        cost = {"agkd_bml_over_pgd_at_per_epoch": a / p, "op_count_bound": op_count_ratio(cfg.attack_steps),
                "note": "student epochs vs PGD-AT fine-tuning epochs of the same seed, same count"}
    any_rep = next(iter(reports[min(reports)].values()))
    return {
        "suite": "robust-classifiers",
        "command": cfg.command,
        "dataset": cfg.data.name,
        "points": any_rep.get("points"),
        "points_sha256": any_rep.get("points_sha256"),
        "n": any_rep["n"],
        "eps": cfg.eval_eps,
        "seeds": list(sorted(reports)),
        "budget": {"arch": cfg.model.arch, "train_subset": cfg.data.train_subset, "epochs": cfg.epochs,
                   "teacher_epochs": cfg.teacher_epochs, "batch_size": cfg.batch_size,
                   "optim": cfg.optim.model_dump(mode="json"), "attack": cfg.attack.model_dump(mode="json"),
                   "attack_steps": cfg.attack_steps},
        "attacks": [a.model_dump(mode="json") for a in cfg.eval_attacks],
        "sanity_points": any_rep.get("sanity_points"),
        "runs": per_run,
        "protocols": protocols,
        "cost": cost,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "config": cfg.model_dump(mode="json"),
    }


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _p(v: float) -> str:
    return f"{v:.3g}" if v >= 1e-3 else "<0.001"


def sanity_line(runs: dict, points) -> str:
    """The gradient-masking checks of every run and seed in one sentence: the flags raised (a check's flag True),
    then the checks that could not run and why (their flag reads "not checked (why)")."""
    raised, unchecked = set(), {}
    for run, r in runs.items():
        for seed, v in r["seeds"].items():
            for check, flag in v["sanity_flags"].items():
                if check == "any_flag":
                    continue
                if flag is True:
                    raised.add(f"{run} (seed {seed}): {check}")
                elif isinstance(flag, str):
                    unchecked.setdefault(f"{check} {flag.removeprefix('not checked ')}", []).append(run)
    line = (f"Sanity flags (SPEC.md section 3, first {points} points): "
            + ("; ".join(sorted(raised)) if raised else "none raised") + ".")
    if unchecked and all(len(set(v)) == len(runs) for v in unchecked.values()):
        line += " Not checked, in every run: " + "; ".join(sorted(unchecked)) + "."
    elif unchecked:
        line += " Not checked: " + "; ".join(f"{k} in {', '.join(sorted(set(v)))}"
                                            for k, v in sorted(unchecked.items())) + "."
    return line


def _points_text(summary: dict) -> str:
    points = summary["points"] or "test points"
    where = "" if str(points).startswith("full test set") else " of the test set"
    return f"{points} ({summary['n']:,} points, the same for every run){where}"


def markdown(summary: dict) -> str:
    runs = summary["runs"]
    names = list(next(iter(runs.values()))["pooled"]["attacks"])
    b = summary["budget"]
    subset = "all 60,000" if b["train_subset"] is None else f"{b['train_subset']:,} (fixed seeded subset)"
    lines = [
        f"Training: {b['arch']}, {subset} training images, batch {b['batch_size']}, {b['optim']['name'].upper()} "
        f"lr {b['optim']['lr']} {b['optim']['schedule']}; training attacks L-inf eps {b['attack']['eps']:g}, "
        f"{b['attack_steps']} steps of {b['attack']['step']:g}. Budget: E = {b['epochs']} epochs per method in "
        f"all; AGKD-BML's teacher (`standard`) trains T = {b['teacher_epochs']} and its student E - T from the "
        "teacher's weights. Seeds: " + ", ".join(str(s) for s in summary["seeds"]) + ".",
        f"Evaluation: {_points_text(summary)}, L-inf "
        f"eps {summary['eps']:g}, attacks as a cascade (each only on points still robust): each attack column is "
        "the accuracy after it, the last the worst case per point. Figures pool all seeds (mean; the worst case's "
        "95 % Wilson interval over seeds x points).",
        "",
    ]
    for proto, pr in summary["protocols"].items():
        what = ("equal total budget: PGD-AT and TRADES train E epochs from scratch" if proto == "equal-total" else
                "same start: PGD-AT and TRADES fine-tuned from the same standard model as AGKD-BML's student, "
                "E - T epochs")
        lines += [f"**{proto}** ({what}):", "",
                  "| run | start | epochs consumed | clean | " + " | ".join(names)
                  + " | worst case (95 % CI) | per seed |",
                  "|---" * (len(names) + 6) + "|"]
        for run in pr["rows"]:
            r = runs[run]
            po = r["pooled"]
            lo, hi = po["worst_case_ci95"]
            per_seed = " / ".join(_pct(v["worst_case"]) for v in r["seeds"].values())
            cells = [run, r["start"], str(r["epochs_consumed"]), _pct(po["clean"])]
            cells += [_pct(po["attacks"][k]) for k in names]
            cells += [f"**{_pct(po['worst_case'])}** ({100 * lo:.1f}-{100 * hi:.1f})", per_seed]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| AGKD-BML variant | vs | worst-case diff (95 % CI) | p (paired bootstrap, one-sided) | "
                      "McNemar p per seed | clean gap | verdict |", "|---|---|---|---|---|---|---|"]
        for m, comps in pr["comparisons"].items():
            for base, c in comps.items():
                lo, hi = c["worst_case_diff_ci95"]
                mc = " / ".join(_p(v["p_two_sided"]) for v in c["mcnemar_per_seed"].values())
                lines.append(f"| {m} | {base} | {100 * c['worst_case_diff']:+.2f} ({100 * lo:+.2f} to "
                             f"{100 * hi:+.2f}) | {_p(c['p_one_sided'])} | {mc} | {100 * c['clean_gap']:+.2f} | "
                             f"**{c['verdict']}** |")
        lines.append("")
    lines.append("Verdict rule: \"met\" only when AGKD-BML's pooled worst case is higher with p < 0.05 and its clean "
                 "accuracy is at most 1 point below the baseline's; otherwise \"not shown\".")
    lines += ["", sanity_line(runs, summary.get("sanity_points"))]
    c = summary.get("cost") or {}
    if c:
        lines += ["", f"Training cost AGKD-BML / PGD-AT per epoch: **{c['agkd_bml_over_pgd_at_per_epoch']:.2f}x** "
                      f"measured, {c['op_count_bound']:.2f}x by op count (forward = 1, backward = 2)."]
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig) -> int:
    from training.bench.report import render_into
    from training.evaluation.run import evaluate
    from training.trainer import train

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    names = runs_of(cfg)
    for seed in cfg.seeds:
        for r in names:
            train_config(cfg, seed, r)  # validate every run before hours of work
    reports: dict[int, dict[str, dict]] = {}
    for seed in cfg.seeds:
        reports[seed] = {}
        for r in names:
            d = run_dir(cfg, seed, r)
            report_path = d / "evaluation.json"
            if not report_path.is_file():
                t0 = time.perf_counter()
                train(train_config(cfg, seed, r))
                log.info("seed %d %s trained in %.0f s", seed, r, time.perf_counter() - t0)
                evaluate(eval_config(cfg, seed, r))
            if cfg.sanity_checks and "sanity" not in json.loads(report_path.read_text()):
                add_sanity(cfg, seed, r)
            reports[seed][r] = json.loads(report_path.read_text())
            log.info("seed %d %s: clean %.4f worst %.4f", seed, r, reports[seed][r]["clean_accuracy"],
                     _row(reports[seed][r], cfg.eval_eps)["worst_case"])
    digests = {rep.get("points_sha256") for per in reports.values() for rep in per.values()}
    if len(digests) > 1:
        raise RuntimeError("the runs were evaluated on different points; delete their evaluation.json and rerun")
    summary = summarise(cfg, reports)
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2) + "\n")
    print(render_into(results.stem, Path(cfg.benchmarks_md), results.parent))
    return 0
