"""``robustserve bench robust-embedders``: triplet, EST, ACT, HM[S, g_LGA] and HM[S, g_LGA] + ICS trained
with C2F2 on Fashion-MNIST under one budget (same data, SPC-2 batch, optimiser, steps, seed, training threat
model and PGD steps), then the benign retrieval metrics and the ranking-attack suite (rob28) on the same
fixed queries against the full test gallery. Writes a JSON report under ``benchmarks/results/``; its
BENCHMARKS.md section is rendered from it (``robustserve bench render``).

Resumable: training continues from each run's ``last.pt``; a variant whose ``evaluation.json`` exists is not
evaluated again. The defaults are a CPU budget (about an hour on a shared 2-core machine);
``FULL_PROTOCOL`` and ``configs/embedders/bench-full.yaml`` hold the full protocol.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field

from serving.runtime.spec import Frozen, ThreatModel
from training.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig

log = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "triplet": ("triplet", {}),
    "est": ("est", {}),
    "act": ("act", {}),
    "hm": ("hm", {"source": "softhard", "destination": "lga"}),
    "hm-ics": ("hm", {"source": "softhard", "destination": "lga", "ics_lambda": 0.5}),
}

# robrank's published Fashion-MNIST rows (C2F2, 32-step training, rob28 attacks).
PUBLISHED = {
    "triplet": {"R@1": 87.6, "ERS": 4.2},
    "est": {"R@1": 76.6, "ERS": 38.7},
    "act": {"R@1": 78.7, "ERS": 63.3},
}

FULL_PROTOCOL = {
    "train": "all 60,000 training images, 16 full SPC-2 epochs of 535 batches of 112",
    "attack_steps": 32,
    "attack": "L-inf eps 77/255, step 3/255 (robrank's 28x28 training setting)",
    "queries": "all 10,000 test images against the full test gallery",
    "config": "configs/embedders/bench-full.yaml",
}

ROB28 = ThreatModel(norm="linf", eps=77 / 255, step=12 / 255)


class BenchConfig(Frozen):
    """Defaults: the CPU budget. FULL_PROTOCOL (and configs/embedders/bench-full.yaml) is the full one."""

    out_dir: str = "benchmarks/work/robust-embedders"
    results: str = "benchmarks/results/robust_embedders.json"
    benchmarks_md: str = "BENCHMARKS.md"
    variants: tuple[str, ...] = ("triplet", "est", "act", "hm", "hm-ics")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-variant overrides
    data: DataConfig = DataConfig(augment=False)
    model: ModelConfig = ModelConfig(arch="c2f2")
    optim: OptimConfig = OptimConfig(name="adam", lr=1e-3, weight_decay=4e-4, schedule="constant")
    batch_size: int = Field(112, ge=2)  # 56 SPC-2 pairs, as in the paper
    epochs: int = Field(2, ge=1)  # checkpoints between them; the budget is epochs x steps_per_epoch batches
    steps_per_epoch: Optional[int] = Field(50, ge=1)  # None: a full SPC-2 epoch (N / batch_size batches)
    # Training PGD: eta steps; the step spreads robrank's 32 x 3/255 travel over 8 steps.
    attack: ThreatModel = ROB28
    attack_steps: int = Field(8, ge=1)
    # Evaluation: benign metrics on the full test set; attacks on the first `queries` of a seeded permutation.
    # 1,000 queries: a 0/100 outcome's standard error is at most 50 / sqrt(1000) = 1.6 pt.
    queries: Optional[int] = Field(1000, ge=1)
    profile: str = "rob28"
    eval_batch_size: int = Field(250, ge=1)
    seed: int = 0
    device: str = "cpu"
    num_threads: Optional[int] = 1  # one thread each is faster than two on a shared 2-core machine
    command: str = "robustserve bench robust-embedders"  # recorded beside the table


def train_config(cfg: BenchConfig, variant: str) -> TrainConfig:
    method, options = VARIANTS[variant]
    options = {**options, **cfg.method_options.get(variant, {})}
    return TrainConfig(
        data=cfg.data, model=cfg.model, optim=cfg.optim, epochs=cfg.epochs, batch_size=cfg.batch_size,
        max_steps_per_epoch=cfg.steps_per_epoch, seed=cfg.seed, device=cfg.device, num_threads=cfg.num_threads,
        out_dir=str(Path(cfg.out_dir) / variant), eval_every=0,
        method=MethodConfig(name=method, options=options, attack=cfg.attack, attack_steps=cfg.attack_steps))


def evaluate_run(cfg: BenchConfig, run: Path) -> dict:
    from training.checkpoint import load_model
    from training.data import load_dataset
    from training.evaluation.embedder_report import PROFILES, evaluate_embedder
    from training.trainer import fixed_subset

    from training.device import resolve_device

    device = resolve_device(cfg.device)
    model, spec, _ = load_model(run / "model.pt", map_location=device)
    test = load_dataset(cfg.data.name, "test", cfg.data.root, **cfg.data.options)
    x, y = test.get(torch.arange(len(test)))
    x, y = x.to(device), y.to(device)
    idx = fixed_subset(len(test), cfg.queries, cfg.seed)
    queries = torch.arange(len(test)) if idx is None else idx
    report = evaluate_embedder(model, x, y, queries, PROFILES[cfg.profile], seed=cfg.seed,
                               batch_size=cfg.eval_batch_size)
    report["points"] = ("full test set" if idx is None else
                        f"queries: first {len(idx)} of a permutation seeded {cfg.seed}; gallery: full test set")
    return report


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def seconds_per_step(run: Path) -> float:
    rows = _epochs(run)
    return sum(r["seconds"] for r in rows) / max(1, len(rows))


def pgd_steps_taken(run: Path, cfg: BenchConfig, variant: str) -> float:
    """Mean training PGD steps per batch: HM logs the steps it took (it stops early); EST and ACT always take
    ``attack_steps``; plain triplet none. A machine-independent cost measure beside the noisy seconds."""
    rows = _epochs(run)
    if rows and "pgd_steps" in rows[0]:
        return sum(r["pgd_steps"] for r in rows) / len(rows)
    return 0.0 if VARIANTS[variant][0] == "triplet" else float(cfg.attack_steps)


# Images one training PGD step perturbs per SPC-2 batch of B: EST the batch, ACT its B/2 pairs' two sides, HM its
# B/2 triplets' three members; a step is one forward-backward over them, so cost = PGD steps x these images.
ATTACKED_PER_STEP: dict[str, float] = {"triplet": 0.0, "est": 1.0, "act": 1.0, "hm": 1.5}


def image_gradients_per_batch(method: str, pgd_steps: float, batch_size: int) -> float:
    return round(pgd_steps * ATTACKED_PER_STEP[method] * batch_size, 1)


def summarise(cfg: BenchConfig, reports: dict[str, dict], step_seconds: dict[str, float],
              pgd_steps: dict[str, float], command: str = "robustserve bench robust-embedders") -> dict:
    steps = cfg.steps_per_epoch
    full_epoch_batches = (cfg.data.train_subset or 60000) // cfg.batch_size
    rows = {}
    for v, r in reports.items():
        # step_seconds holds the mean seconds of one trainer epoch (steps_per_epoch batches, or a full one).
        per_step = step_seconds[v] / (steps or full_epoch_batches)
        rows[v] = {"benign": r["benign"], "attacks": r["attacks"], "terms": r["terms"], "ERS": r["ERS"],
                   "terms_se": r.get("terms_se"), "ERS_se": r.get("ERS_se"),
                   "pgd_steps_per_batch": round(pgd_steps[v], 2),
                   "image_gradients_per_batch": image_gradients_per_batch(VARIANTS[v][0], pgd_steps[v],
                                                                          cfg.batch_size),
                   "seconds_per_batch": round(per_step, 3),
                   "seconds_per_full_epoch": round(per_step * full_epoch_batches, 1),
                   "eval_seconds": r["seconds"], "published": PUBLISHED.get(v)}
    return {"suite": "robust-embedders", "command": command, "config": cfg.model_dump(mode="json"),
            "full_protocol": FULL_PROTOCOL,
            "points": next(iter(reports.values()))["points"] if reports else None,
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "variants": rows}


def _se(row: dict) -> str:
    """' +- SE' of the ERS (results written before standard errors were recorded have none)."""
    se = row.get("ERS_se")
    return "" if se is None else f" +- {se:.1f}"


def _term_se_line(summary: dict) -> list[str]:
    rows = {v: r["terms_se"] for v, r in summary["variants"].items() if r.get("terms_se")}
    if not rows:
        return ["", "Standard errors: not recorded in this results file (it predates them)."]
    names = list(next(iter(rows.values())))
    out = ["", "Standard error of each ERS term (over queries):", "",
           "| variant | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    out += [f"| {v} | " + " | ".join(f"{se[k]:.2f}" for k in names) + " |" for v, se in rows.items()]
    return out


def markdown(summary: dict) -> str:
    c = summary["config"]
    head = ("| variant | R@1 | R@2 | mAP | NMI | CA+ | CA- | QA+ | QA- | TMA | ES:D | ES:R | LTM | GTM | GTT | ERS "
            "| PGD steps/batch | image-gradients/batch | s/batch | robrank R@1 / ERS |")
    batches = c["epochs"] * (c["steps_per_epoch"] or (c["data"]["train_subset"] or 60000) // c["batch_size"])
    lines = [f"Budget, the same for every variant: C2F2, {batches} SPC-2 batches of "
             f"{c['batch_size']} from the 60,000 training images, Adam lr {c['optim']['lr']}, "
             f"training PGD {c['attack_steps']} steps, L-inf eps {c['attack']['eps'] * 255:.0f}/255, "
             f"step {c['attack']['step'] * 255:.2f}/255. Attacks: rob28 (eps 77/255, step 3/255, 32 steps, "
             f"no random start), W = M = 1, {summary['points']}. Benign metrics: all 10,000 test images. "
             f"Full protocol: {json.dumps(summary['full_protocol'])}.", "",
             "Attack columns are the raw values (CA/QA: rank percentile %, TMA: cosine, ES:D: embedding shift, "
             "ES:R/LTM/GTM: Recall@1 %, GTT: % top-1 kept in the top 4); ERS is the mean of their ten terms. "
             "Cost: image-gradients per batch = training PGD steps x images each step perturbs (EST and ACT: the "
             "batch; HM: its triplets' three members, 1.5 x the batch); s/batch is wall time on a shared machine.",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for v, r in summary["variants"].items():
        b, a = r["benign"], r["attacks"]
        pub = r.get("published")
        pub_s = f"{pub['R@1']} / {pub['ERS']}" if pub else "-"
        grads = r.get("image_gradients_per_batch")
        if grads is None:  # results written before the column existed
            grads = image_gradients_per_batch(VARIANTS[v][0], r["pgd_steps_per_batch"], c["batch_size"])
        lines.append(
            f"| {v} | {b['R@1']:.1f} | {b['R@2']:.1f} | {b['mAP']:.1f} | {b['NMI']:.1f} | {a['CA+']:.1f} | "
            f"{a['CA-']:.1f} | {a['QA+']:.1f} | {a['QA-']:.1f} | {a['TMA']:.3f} | {a['ES:D']:.3f} | {a['ES:R']:.1f} | "
            f"{a['LTM']:.1f} | {a['GTM']:.1f} | {a['GTT']:.1f} | **{r['ERS']:.1f}**{_se(r)} | "
            f"{r['pgd_steps_per_batch']} | "
            f"{grads:g} | {r['seconds_per_batch']} | {pub_s} |")
    lines += _term_se_line(summary)
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig) -> int:
    from training.trainer import train

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict] = {}
    step_seconds: dict[str, float] = {}
    pgd_steps: dict[str, float] = {}
    for v in cfg.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        run_dir = out / v
        ev = run_dir / "evaluation.json"
        if ev.is_file():
            log.info("%s: evaluation exists, reusing %s", v, ev)
        else:
            t0 = time.perf_counter()
            train(train_config(cfg, v))
            log.info("%s: trained in %.0f s", v, time.perf_counter() - t0)
            report = evaluate_run(cfg, run_dir)
            ev.write_text(json.dumps(report, indent=2))
        reports[v] = json.loads(ev.read_text())
        step_seconds[v] = seconds_per_step(run_dir)
        pgd_steps[v] = pgd_steps_taken(run_dir, cfg, v)
        log.info("%s: R@1 %.1f ERS %.1f", v, reports[v]["benign"]["R@1"], reports[v]["ERS"])
    summary = summarise(cfg, reports, step_seconds, pgd_steps, cfg.command)
    res = Path(cfg.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(summary, indent=2) + "\n")
    from training.bench.report import render_into

    print(render_into(res.stem, Path(cfg.benchmarks_md), res.parent))
    return 0
