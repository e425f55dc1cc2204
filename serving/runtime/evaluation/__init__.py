"""Robustness measurement shared by offline evaluation (``training.evaluation``) and in-server probes: the attack
cascade with worst case per point, confidence intervals, gradient-masking checks, and the ranking-attack suite.
Imports torch and the attack library, never ``training``."""
