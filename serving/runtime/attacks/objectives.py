"""Per-sample attack objectives on classifier logits, all written as losses to MAXIMISE.

Every objective has the signature ``(logits [B, K], y [B] int64, target [B] int64 | None) -> [B]``.
Untargeted objectives grow as the true class ``y`` loses; targeted ones grow as ``target`` wins.
Algorithms sum them over the batch only to get per-sample input gradients in one backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ObjectiveFn = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]

# Keeps the DLR ratio finite when the top logits tie (Croce & Hein use the same constant).
_DLR_EPS = 1e-12


def _pick(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """logits[b, idx[b]]: [B, K], [B] -> [B]."""
    return logits.gather(1, idx.unsqueeze(1)).squeeze(1)


def _max_except(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """max over k != idx[b] of logits[b, k]: [B, K], [B] -> [B]."""
    mask = F.one_hot(idx, logits.shape[1]).bool()
    return logits.masked_fill(mask, float("-inf")).amax(dim=1)


def ce(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the true class (Madry et al. 2018). [B, K], [B] -> [B]."""
    return F.cross_entropy(logits, y, reduction="none")


def targeted_ce(logits: torch.Tensor, y: Optional[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Minus the cross-entropy of ``target``: maximising it pulls the prediction to ``target``.
    ``y`` is unused (may be None). [B, K], -, [B] -> [B]."""
    return -F.cross_entropy(logits, target, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Carlini & Wagner (2017) margin, unclamped: max_{k != y} z_k - z_y.
    Positive exactly when the sample is misclassified. [B, K], [B] -> [B]."""
    return _max_except(logits, y) - _pick(logits, y)


def targeted_cw_margin(logits: torch.Tensor, y: Optional[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Targeted margin z_t - max_{k != t} z_k: positive exactly when ``target`` wins.
    ``y`` is unused (may be None). [B, K], -, [B] -> [B]."""
    return _pick(logits, target) - _max_except(logits, target)


def dlr(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020):
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), pi the logits sorted in decreasing order.

    Shift- and scale-invariant in the logits, so a model cannot hide behind rescaled outputs
    the way it can with cross-entropy. Needs K >= 3. [B, K], [B] -> [B].
    """
    top = logits.sort(dim=1, descending=True).values
    return -(_pick(logits, y) - _max_except(logits, y)) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def targeted_dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, APGD-T): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    Needs K >= 4. [B, K], [B], [B] -> [B]."""
    top = logits.sort(dim=1, descending=True).values
    denom = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS
    return -(_pick(logits, y) - _pick(logits, target)) / denom


@dataclass(frozen=True)
class Objective:
    """A named objective with its calling contract checked on every call.

    ``targeted``: needs ``target``; ``needs_y``: needs the true labels; ``min_classes``: smallest K.
    """

    name: str
    fn: ObjectiveFn
    targeted: bool
    needs_y: bool = True
    min_classes: int = 2

    def __call__(self, logits: torch.Tensor, y: Optional[torch.Tensor],
                 target: Optional[torch.Tensor] = None) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"objective {self.name!r} needs logits [B, K], got shape {tuple(logits.shape)}")
        b, k = logits.shape
        if k < self.min_classes:
            raise ValueError(f"objective {self.name!r} needs at least {self.min_classes} classes, got {k}")
        if self.needs_y:
            _check_labels(self.name, "y", y, b)
        if self.targeted:
            _check_labels(self.name, "target", target, b)
        elif target is not None:
            raise ValueError(f"objective {self.name!r} is untargeted and takes no target; "
                             f"use a targeted one ({', '.join(n for n, o in OBJECTIVES.items() if o.targeted)})")
        return self.fn(logits, y, target)


def _check_labels(name: str, what: str, t: Optional[torch.Tensor], b: int) -> None:
    if t is None:
        kind = "the targeted objective" if what == "target" else "objective"
        raise ValueError(f"{kind} {name!r} needs {what} (int64 [B])")
    if t.shape != (b,) or t.dtype != torch.int64:
        raise ValueError(f"{name!r}: {what} must be an int64 tensor of shape [{b}], got {t.dtype} {tuple(t.shape)}")


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("ce", ce, targeted=False),
        Objective("targeted_ce", targeted_ce, targeted=True, needs_y=False),
        Objective("cw", cw_margin, targeted=False),
        Objective("targeted_cw", targeted_cw_margin, targeted=True, needs_y=False),
        Objective("dlr", dlr, targeted=False, min_classes=3),
        Objective("targeted_dlr", targeted_dlr, targeted=True, min_classes=4),
    )
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
