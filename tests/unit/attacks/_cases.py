"""Test tables derived from the attack registry: every registered attack, cut to a budget that runs in
milliseconds."""
from __future__ import annotations

from serving.runtime.attacks import get_attack

# The options that set an attack's cost, and the small values the contract tests run them with.
FAST_BUDGET = {"steps": 5, "n_target_classes": 3}


def fast_options(name: str) -> dict[str, int]:
    """The cheap version of a registered attack's options: each budget option its constructor takes."""
    cls = get_attack(name)
    return {k: v for k, v in FAST_BUDGET.items() if cls.takes(k)}
