"""Robustness evaluation: the attack cascade, worst case per point, sanity flags, reports and plots."""
