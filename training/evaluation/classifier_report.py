"""The offline robustness report of a classifier: the cascade of :mod:`serving.runtime.evaluation.classification`
over every eps of a table and a curve, clean and worst-case figures with intervals and per-point outcomes, the
gradient-masking checks of SPEC.md, the markdown table and the robustness-curve plot. What ``robustserve evaluate``,
the benches and the zoo cards write; the in-server probes use the runtime module alone.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Sequence

import torch
from torch import nn

from serving.runtime.evaluation.classification import (  # noqa: F401  (re-exported for training code)
    AttackSpec,
    cascade,
    eps_monotone,
    gradient_checks,
    label,
    make_attack,
    predict,
    run_attack_on,
    wilson_interval,
)
from training.evaluation.significance import encode_mask

log = logging.getLogger(__name__)


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, curve: dict[float, float],
                  seed: int, batch_size: int, norm: str = "linf", n: int = 500) -> dict:
    """The gradient-masking checks of SPEC.md section 3 on up to ``n`` points. Each entry has its measured
    figures and ``flag`` (True means suspicious)."""
    x, y = x[:n], y[:n]
    out: dict = {}
    # 1. Robust accuracy must not rise with eps.
    out["eps_monotone"] = eps_monotone(curve)
    # 2. At a very large eps (0.5 in L-inf: every image can be turned grey) PGD must reach ~0.
    big = 0.5 if norm == "linf" else 10.0
    pgd = AttackSpec(name="pgd", steps=20, norm=norm)
    acc_big = run_attack_on(model, pgd, x, y, big, seed, batch_size).float().mean().item()
    out["large_eps"] = {"eps": big, "pgd20_accuracy": acc_big, "flag": acc_big > 0.05}
    # 3. More PGD steps must not raise robust accuracy.
    acc_few = run_attack_on(model, AttackSpec(name="pgd", steps=10, norm=norm), x, y, eps, seed, batch_size)
    acc_many = run_attack_on(model, AttackSpec(name="pgd", steps=100, norm=norm), x, y, eps, seed, batch_size)
    f, m = acc_few.float().mean().item(), acc_many.float().mean().item()
    out["more_steps"] = {"pgd10": f, "pgd100": m, "flag": m > f + 0.01}
    # 4. Input gradients must not vanish, and outputs must be logits rather than probabilities.
    out.update(gradient_checks(model, x[:batch_size], y[:batch_size]))
    # 5. A black-box attack must not beat the white-box ones: random corners of the eps-ball.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        alive = predict(model, x, batch_size) == y
        for _ in range(20):
            noise = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1).to(x.device) * eps
            alive &= predict(model, (x + noise).clamp(0, 1), batch_size) == y
    bb = alive.float().mean().item()
    wb = curve.get(eps, min(curve.values()) if curve else 1.0)
    out["black_box"] = {"random_corners_20": bb, "white_box_worst": wb, "flag": bb < wb - 0.01}
    out["any_flag"] = any(v.get("flag") for v in out.values() if isinstance(v, dict))
    return out


def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[AttackSpec],
                        eps_list: Iterable[float], curve_eps: Iterable[float] = (), seed: int = 0,
                        batch_size: int = 256, sanity: bool = True) -> dict:
    """x: [N, C, H, W] in [0, 1] on the model's device; y: [N]. Returns the report dict (JSON-ready)."""
    model.eval()
    n = len(x)
    t0 = time.perf_counter()
    clean_mask = predict(model, x, batch_size) == y
    clean = clean_mask.float().mean().item()
    rows = []
    curve: dict[float, float] = {}
    all_eps = sorted(set(eps_list) | set(curve_eps))
    for eps in all_eps:
        cum, robust, secs = cascade(model, attacks, x, y, eps, seed, batch_size)
        k = int(robust.sum().item())
        rows.append({"eps": eps, "attacks": cum, "worst_case": k / n, "worst_case_ci95": wilson_interval(k, n),
                     "seconds": secs, "in_table": eps in set(eps_list),
                     # per point, bit-packed (training.evaluation.significance.decode_mask): paired tests
                     "worst_case_points": encode_mask(robust.cpu().numpy())})
        curve[eps] = k / n
        log.info("eps %g: %s worst %.4f", eps, cum, k / n)
    report = {
        "n": n,
        "clean_accuracy": clean,
        "clean_ci95": wilson_interval(int(clean_mask.sum().item()), n),
        "clean_points": encode_mask(clean_mask.cpu().numpy()),
        "attacks": [a.model_dump(mode="json") for a in attacks],
        "cascade": True,
        "results": rows,
    }
    if sanity:
        main_eps = min(eps_list)
        report["sanity"] = sanity_checks(model, x, y, main_eps, curve, seed, batch_size,
                                         norm=attacks[0].norm if attacks else "linf")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def format_table(report: dict) -> str:
    rows = [r for r in report["results"] if r.get("in_table", True)] or report["results"]
    names = list(rows[0]["attacks"]) if rows else []
    head = ["eps", "clean"] + names + ["worst case"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [f"{r['eps']:g}", f"{100 * report['clean_accuracy']:.2f}"]
        cells += [f"{100 * r['attacks'][k]:.2f}" for k in names]
        cells.append(f"{100 * r['worst_case']:.2f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot_curve(report: dict, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["results"], key=lambda r: r["eps"])
    eps = [0.0] + [r["eps"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(rows[0]["attacks"]) if rows else []
    for k in names:
        ax.plot(eps, [100 * report["clean_accuracy"]] + [100 * r["attacks"][k] for r in rows], marker="o", label=k)
    ax.plot(eps, [100 * report["clean_accuracy"]] + [100 * r["worst_case"] for r in rows], "k--", lw=2,
            label="worst case")
    ax.set_xlabel("eps (pixel units, [0, 1] images)")
    ax.set_ylabel("accuracy (%)  [cascade: cumulative]")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "robustness curve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
