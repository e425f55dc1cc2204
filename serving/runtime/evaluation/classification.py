"""Classifier robustness under an attack suite, worst case per point (AutoAttack's cascade).

For each eps, attack i runs only on the points that survived attacks 0..i-1, so the figure after the last
attack is the worst case per point; each attack's column is the cumulative robust accuracy after it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm

from serving.runtime.spec import Frozen, ThreatModel

# Called with (x_adv [b, C, H, W], positions [b] in the attacked set) for every batch an attack produced.
AdversarialSink = Callable[[torch.Tensor, torch.Tensor], None]


class AttackSpec(Frozen):
    """One attack of a suite. eps comes from the evaluation's (or probe's) eps list. ``name`` is a registered
    attack (:func:`serving.runtime.attacks.list_attacks`); ``steps`` left out is that attack's default (1 for
    FGSM, 10 for PGD and CW, 100 for APGD)."""

    name: str
    steps: int = Field(None, ge=1)  # type: ignore[assignment]  (None is replaced by the attack's default)
    restarts: int = Field(1, ge=1)
    step_ratio: float = Field(0.25, gt=0)  # step = step_ratio * eps (PGD, CW)
    norm: Literal["linf", "l2"] = "linf"
    n_target_classes: int = Field(9, ge=1)  # APGD-T: target classes tried (AutoAttack's 9)

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, data: Any) -> Any:
        from serving.runtime.attacks import get_attack

        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        attack = get_attack(data["name"])  # ValueError naming the registered attacks
        steps = data.get("steps")
        if steps is None:
            return {**data, "steps": attack.defaults()["steps"]}
        if not attack.takes("steps") and steps != 1:
            raise ValueError(f"{data['name']} takes exactly 1 step, got steps={steps}")
        return data

    def options(self) -> dict[str, Any]:
        """The attack-specific options this attack's constructor takes (``n_target_classes`` for APGD-T)."""
        from serving.runtime.attacks import get_attack

        return {"n_target_classes": self.n_target_classes} if get_attack(self.name).takes("n_target_classes") else {}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for s in range(0, len(x), batch_size):
        out.append(model(x[s:s + batch_size]).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def make_attack(spec: AttackSpec, model: nn.Module, eps: float, seed: int):
    from serving.runtime.attacks import build_attack

    threat = ThreatModel(norm=spec.norm, eps=eps, step=max(spec.step_ratio * eps, 1e-8))
    return build_attack(spec.name, model, threat, steps=spec.steps, restarts=spec.restarts, seed=seed,
                        **spec.options())


def run_attack_on(model: nn.Module, attack_spec: AttackSpec, x: torch.Tensor, y: torch.Tensor, eps: float,
                  seed: int, batch_size: int, desc: str = "", sink: Optional[AdversarialSink] = None,
                  progress: bool = True, deadline: Optional[float] = None) -> torch.Tensor:
    """Returns a bool mask [N]: True where the model still classifies the attacked point correctly. ``sink``
    receives every batch of adversarial examples with its positions in x. Past ``deadline``
    (time.monotonic()) a TimeoutError is raised before the next batch."""
    attack = make_attack(attack_spec, model, eps, seed)
    keep = torch.empty(len(x), dtype=torch.bool, device=x.device)
    for s in tqdm(range(0, len(x), batch_size), desc=desc, leave=False,
                  disable=not progress or len(x) <= batch_size):
        _check_deadline(deadline, f"{label(attack_spec)} at eps {eps:g}")
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        xa = attack(xb, yb)
        if sink is not None:
            sink(xa, torch.arange(s, s + len(xb), device=x.device))
        with torch.no_grad():
            keep[s:s + batch_size] = model(xa).argmax(1) == yb
    return keep


def cascade(model: nn.Module, attacks: Sequence[AttackSpec], x: torch.Tensor, y: torch.Tensor, eps: float,
            seed: int, batch_size: int, sink: Optional[Callable[[str, torch.Tensor, torch.Tensor], None]] = None,
            progress: bool = True, deadline: Optional[float] = None
            ) -> tuple[dict[str, float], torch.Tensor, dict[str, float]]:
    """Runs ``attacks`` in order on still-robust points. Returns (cumulative accuracy after each attack,
    robust mask [N] = worst case per point, seconds per attack). ``sink(label, x_adv, positions in x)`` sees
    every adversarial batch; past ``deadline`` (time.monotonic()) a TimeoutError is raised between attacks."""
    robust = predict(model, x, batch_size) == y
    n = len(x)
    cumulative, seconds = {}, {}
    for a in attacks:
        t0 = time.perf_counter()
        idx = robust.nonzero().squeeze(1)
        if len(idx):
            inner = None if sink is None else (lambda xa, pos, _a=a, _idx=idx: sink(label(_a), xa, _idx[pos]))
            still = run_attack_on(model, a, x[idx], y[idx], eps, seed, batch_size, desc=f"{a.name} eps={eps:g}",
                                  sink=inner, progress=progress, deadline=deadline)
            robust[idx[~still]] = False
        # A budget overrun in the last batch of an attack is an overrun too.
        _check_deadline(deadline, f"after {label(a)} at eps {eps:g}")
        cumulative[label(a)] = robust.sum().item() / n if n else 0.0
        seconds[label(a)] = round(time.perf_counter() - t0, 2)
    return cumulative, robust, seconds


def _check_deadline(deadline: Optional[float], where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"time budget spent ({where})")


def label(a: AttackSpec) -> str:
    """The attack's display name with its step budget: 'FGSM', 'PGD-20', 'CW-20', 'APGD-CE-100', 'APGD-T-100x9'
    (the column names of results JSON)."""
    from serving.runtime.attacks import get_attack

    return get_attack(a.name).label(a.steps, **a.options())


# --- gradient-masking checks (SPEC section 3) ------------------------------------------------------------------


def eps_monotone(curve: dict[float, float], slack: float = 0.005) -> dict:
    """Robust accuracy must not rise with eps. curve: {eps: accuracy}; flag True when it rises by more than
    ``slack`` between consecutive eps. With fewer than two eps nothing is checked: ``checked`` False and
    ``flag`` None (never False, which would read as "checked, fine")."""
    eps_sorted = sorted(curve)
    out = {"curve": {f"{e:g}": curve[e] for e in eps_sorted}}
    if len(eps_sorted) < 2:
        return {**out, "flag": None, "checked": False, "why": "one eps: monotonicity needs two or more"}
    rises = [(a, b) for a, b in zip(eps_sorted, eps_sorted[1:]) if curve[b] > curve[a] + slack]
    return {**out, "flag": bool(rises), "checked": True}


def flag_summary(flags: dict) -> dict:
    """{check: True/False, or "not checked (why)"} of a flags dict, for people and logs."""
    return {k: (v.get("flag") if v.get("checked", True) else f"not checked ({v.get('why', 'skipped')})")
            for k, v in flags.items() if isinstance(v, dict)}


def gradient_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Input gradients of the cross-entropy must not vanish, and the outputs must be logits, not probabilities.
    x [B, C, H, W], y [B]. Returns {"zero_gradients": {fraction, flag}, "softmax_outputs": {flag}}. Runs
    under ``torch.enable_grad()`` on a fresh leaf, so it works inside a host's inference or no-grad mode."""
    from serving.runtime.attacks import eval_mode

    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        # Fresh copies of both: tensors made under a host's inference mode cannot be saved for backward.
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        loss = nn.functional.cross_entropy(logits, y.detach().clone(), reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    zero = (g.flatten(1).abs().amax(1) == 0).float().mean().item() if len(x) else 0.0
    with torch.no_grad():
        lg = logits.detach()
        looks_prob = bool(len(lg) and ((lg >= 0) & (lg <= 1)).all()
                          and torch.allclose(lg.sum(1), torch.ones_like(lg[:, 0]), atol=1e-3))
    return {"zero_gradients": {"fraction": zero, "flag": zero > 0.01}, "softmax_outputs": {"flag": looks_prob}}
