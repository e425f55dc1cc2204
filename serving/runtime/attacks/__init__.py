"""Adversarial attacks = threat model (:class:`LpBall`) x objective (:data:`OBJECTIVES`) x algorithm
(:func:`pgd`, :func:`apgd`). Classification attacks share the :class:`Attack` base class, are registered as
classes (:func:`register_attack`: the registry is the only list of their names) and are built by name with
:func:`build_attack`; :func:`targeted_pgd` is AGKD-BML's batched targeted PGD."""
from serving.runtime.attacks.apgd import APGD, APGDDLR, apgd
from serving.runtime.attacks.apgdt import APGDT
from serving.runtime.attacks.base import (Attack, LogitCache, build_attack, eval_mode, get_attack, list_attacks,
                                          register_attack)
from serving.runtime.attacks.core import input_grad
from serving.runtime.attacks.cw import CW
from serving.runtime.attacks.fgsm import FGSM
from serving.runtime.attacks.objectives import (OBJECTIVES, Objective, ce, cw_margin, dlr, get_objective, targeted_ce,
                                         targeted_cw_margin, targeted_dlr)
from serving.runtime.attacks.pgd import PGD, pgd, targeted_pgd
from serving.runtime.attacks.threat import LpBall

__all__ = [
    "APGD", "APGDDLR", "APGDT", "Attack", "CW", "FGSM", "LogitCache", "LpBall", "OBJECTIVES", "Objective", "PGD", "apgd",
    "build_attack", "ce", "cw_margin", "dlr", "eval_mode", "get_attack", "get_objective", "input_grad", "list_attacks", "pgd",
    "register_attack", "targeted_ce", "targeted_cw_margin", "targeted_dlr", "targeted_pgd",
]
