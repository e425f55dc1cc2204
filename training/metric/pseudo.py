"""Destination pseudo-hardness: functions of the previous iteration's adversarial triplet loss that set the
hardness HM pushes every source triplet toward (the Gradual Adversary), and constant destinations.

With u = margin and r = min(max(l_prev, 0), u) / u in [0, 1]:

- ``lga``: g_LGA = -u * r (Linear Gradual Adversary). A high previous loss (a struggling model) gives the
  easy target -u; a low loss gives a target near 0, a stronger adversary.
- ``lga-square``: -u * r^2 (strengthens faster as the loss falls).
- ``lga-sqrt``: -u * sqrt(r) (strengthens more slowly).
- ``lga-boost``: -u * r + BOOST * (1 - r): like g_LGA but the target keeps rising past 0 to +BOOST (robrank's
  ``uh = 0.1``) once the model fits the adversarial triplets, so the adversary can invert triplets.
- a float c in [-2, 2]: every triplet's destination is c (c = 2 is min-max adversarial training).
"""
from __future__ import annotations

import math
from typing import Callable, Union

from training.metric.hardness import MARGIN

BOOST = 0.1
INITIAL_LOSS = 2.0  # robrank's starting value: the first LGA target is -u


def _ratio(l_prev: float, u: float) -> float:
    return min(max(float(l_prev), 0.0), u) / u


PSEUDO_HARDNESS: dict[str, Callable[[float, float], float]] = {
    "lga": lambda l, u: -u * _ratio(l, u),
    "lga-square": lambda l, u: -u * _ratio(l, u) ** 2,
    "lga-sqrt": lambda l, u: -u * math.sqrt(_ratio(l, u)),
    "lga-boost": lambda l, u: -u * _ratio(l, u) + BOOST * (1.0 - _ratio(l, u)),
}


def pseudo_hardness(destination: Union[str, float], l_prev: float, margin: float = MARGIN) -> float:
    """The destination hardness for every triplet of this iteration (a float in [-2, 2])."""
    if isinstance(destination, (int, float)):
        if not -2.0 <= destination <= 2.0:
            raise ValueError(f"a constant destination hardness lies in [-2, 2], got {destination}")
        return float(destination)
    if destination not in PSEUDO_HARDNESS:
        raise ValueError(f"unknown pseudo-hardness {destination!r}; choose one of {', '.join(PSEUDO_HARDNESS)}")
    return PSEUDO_HARDNESS[destination](l_prev, margin)


class GradualAdversary:
    """Holds l_prev, the previous iteration's adversarial triplet loss, and turns it into the next target.

    The state is local to one process: under DDP each rank keeps its own l_prev from its own shard's loss
    (no all-reduce), so ranks may use slightly different targets; checkpoints store rank 0's value.
    """

    def __init__(self, destination: Union[str, float], margin: float = MARGIN, initial: float = INITIAL_LOSS):
        self.destination = destination
        self.margin = margin
        self.prev_loss = float(initial)
        pseudo_hardness(destination, self.prev_loss, margin)  # validates

    def target(self) -> float:
        return pseudo_hardness(self.destination, self.prev_loss, self.margin)

    def update(self, loss: float) -> None:
        self.prev_loss = float(loss)

    def state_dict(self) -> dict:
        return {"prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        if "prev_loss" in state:
            self.prev_loss = float(state["prev_loss"])
