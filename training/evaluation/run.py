"""``robustserve evaluate``: load a checkpoint, attack a fixed test subset, write report JSON and curve PNG."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from training.checkpoint import load_model
from training.config import EvaluateConfig
from training.device import resolve_device, seed_everything
from training.trainer import fixed_subset

log = logging.getLogger(__name__)


def load_eval_points(cfg: EvaluateConfig, device: torch.device):
    """The stated evaluation points: the full test split, or the first ``subset`` of a seeded permutation."""
    from training.data import load_dataset

    test = load_dataset(cfg.data.name, "test", cfg.data.root, **cfg.data.options)
    idx = fixed_subset(len(test), cfg.subset, cfg.seed)
    if idx is None:
        idx = torch.arange(len(test))
    x, y = test.get(idx)
    return x.to(device), y.to(device), idx


def evaluate(cfg: EvaluateConfig) -> dict:
    from training.evaluation.classifier_report import evaluate_classifier, format_table, plot_curve

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, spec, ckpt = load_model(cfg.checkpoint, map_location=device)
    model.to(device)
    if spec.task == "embedding":
        return evaluate_embedding(cfg, model, spec, device)
    x, y, idx = load_eval_points(cfg, device)
    report = evaluate_classifier(model, x, y, cfg.attacks, cfg.eps, cfg.curve_eps, seed=cfg.seed,
                                 batch_size=cfg.batch_size, sanity=cfg.sanity_checks)
    report.update({
        "checkpoint": str(cfg.checkpoint),
        "arch": spec.arch,
        "method": spec.method,
        "dataset": cfg.data.name,
        "points": f"first {len(idx)} of a permutation seeded {cfg.seed}",
        # which test images, in order: two reports pair point by point only when these agree
        "points_sha256": hashlib.sha256(idx.cpu().numpy().astype("int64").tobytes()).hexdigest(),
        "config": cfg.model_dump(mode="json"),
    })
    if cfg.subset is None:
        report["points"] = "full test set"
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    plot_curve(report, out / "robustness_curve.png", title=f"{spec.arch} / {spec.method} on {cfg.data.name}")
    report["table"] = format_table(report)
    report["files"] = {"report": str(out / "evaluation.json"), "plot": str(out / "robustness_curve.png")}
    return report


def evaluate_embedding(cfg: EvaluateConfig, model, spec, device: torch.device) -> dict:
    """Embedders: benign retrieval metrics on the full test set (queries = gallery), then the ranking-attack
    suite under the profile of the model's input size (rob28 up to 32 px, else rob224) on the stated
    queries (``subset``: the first N of a seeded permutation) against the full test gallery."""
    from training.data import load_dataset
    from training.evaluation.embedder_report import PROFILES, default_profile, evaluate_embedder, format_table

    test = load_dataset(cfg.data.name, "test", cfg.data.root, **cfg.data.options)
    x, y = test.get(torch.arange(len(test)))
    x, y = x.to(device), y.to(device)
    idx = fixed_subset(len(test), cfg.subset, cfg.seed)
    queries = torch.arange(len(test)) if idx is None else idx
    profile = PROFILES[cfg.profile or default_profile(spec.input_size)]
    report = evaluate_embedder(model, x, y, queries, profile, seed=cfg.seed, batch_size=min(cfg.batch_size, 250))
    report.update({
        "checkpoint": str(cfg.checkpoint),
        "arch": spec.arch,
        "method": spec.method,
        "dataset": cfg.data.name,
        "points": "full test set" if idx is None else
        f"queries: first {len(idx)} of a permutation seeded {cfg.seed}; gallery: full test set",
        "config": cfg.model_dump(mode="json"),
    })
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    plot = out / "ers_terms.png"
    _plot_terms(report, plot, title=f"{spec.arch} / {spec.method} on {cfg.data.name}")
    report["table"] = format_table(report)
    report["files"] = {"report": str(out / "evaluation.json"), "plot": str(plot)}
    return report


def _plot_terms(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = report.get("terms") or {}
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(list(terms), list(terms.values()))
    ax.set_ylim(0, 100)
    ax.set_ylabel("ERS term")
    ax.set_title(f"{title}: ERS {report['ERS']:.1f}" if report.get("ERS") is not None else title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
