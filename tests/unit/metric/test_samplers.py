"""Every SPC-2 sampler against a loop oracle of its rule."""
import math

import pytest
import torch

from training.metric import SAMPLERS, sample_triplets
from training.metric.samplers import DW_CUTOFF, DW_NONZERO_LOSS_CUTOFF, distance_weights

from .conftest import spc2_batch

M = 0.2


def _dist(emb, i, j):
    return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(emb[i], emb[j])))


def oracle_sets(emb, labels, i, rule):
    """(allowed positives, allowed negatives) for anchor i per the rule, with fallbacks applied."""
    B = len(labels)
    pos = [j for j in range(B) if j != i and labels[j] == labels[i]]
    neg = [j for j in range(B) if labels[j] != labels[i]]
    d = {j: _dist(emb, i, j) for j in range(B)}
    if rule == "random":
        return [i + 1], neg
    if rule == "semihard":
        dap = d[i + 1]
        win = [j for j in neg if dap < d[j] < dap + M]
        return [i + 1], win or neg
    if rule == "softhard":
        far_pos = max(d[j] for j in pos)
        near_neg = min(d[j] for j in neg)
        ps = [j for j in pos if d[j] > near_neg]
        ns = [j for j in neg if d[j] < far_pos]
        return ps or pos, ns or neg
    if rule == "distance":
        ns = [j for j in neg if d[j] < DW_NONZERO_LOSS_CUTOFF]
        return [i + 1], ns or neg
    if rule == "hardest":
        far = max(pos, key=lambda j: (d[j], -j))
        near = min(neg, key=lambda j: (d[j], j))
        return [far], [near]
    raise ValueError(rule)


@pytest.mark.parametrize("rule", sorted(SAMPLERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_follows_its_rule(rule, seed):
    emb, labels = spc2_batch(pairs=12, classes=4, dim=6, seed=seed)
    g = torch.Generator().manual_seed(seed)
    a, p, n = sample_triplets(emb, labels, rule, M, g)
    assert a.tolist() == list(range(0, 24, 2))
    for k, i in enumerate(a.tolist()):
        ps, ns = oracle_sets(emb, labels, i, rule)
        assert p[k].item() in ps, (rule, i)
        assert n[k].item() in ns, (rule, i)
        assert labels[p[k]] == labels[i] and p[k] != i and labels[n[k]] != labels[i]


@pytest.mark.parametrize("rule", ["random", "semihard", "softhard"])
def test_uniform_samplers_reach_every_allowed_item(rule):
    emb, labels = spc2_batch(pairs=10, classes=3, dim=4, seed=5)
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(300):
        a, p, n = sample_triplets(emb, labels, rule, M, g)
        for k, i in enumerate(a.tolist()):
            seen.setdefault(i, (set(), set()))
            seen[i][0].add(p[k].item())
            seen[i][1].add(n[k].item())
    for i, (ps_seen, ns_seen) in seen.items():
        ps, ns = oracle_sets(emb, labels, i, rule)
        assert ps_seen == set(ps) and ns_seen == set(ns)


def test_distance_weights_match_the_loop_formula():
    emb, labels = spc2_batch(pairs=8, classes=3, dim=16, seed=4)
    from training.metric.hardness import pdist

    anchors = torch.arange(0, 16, 2)
    d = pdist(emb[anchors], emb)
    neg = labels[anchors].unsqueeze(1) != labels.unsqueeze(0)
    w = distance_weights(d, 16, neg)
    for r, i in enumerate(anchors.tolist()):
        logs = {}
        for j in range(16):
            if labels[j] != labels[i] and d[r, j] < DW_NONZERO_LOSS_CUTOFF:
                dc = max(float(d[r, j]), DW_CUTOFF)
                logs[j] = -((16 - 2) * math.log(dc) + (16 - 3) / 2 * math.log(1 - dc * dc / 4))
        top = max(logs.values()) if logs else 0.0
        for j in range(16):
            ref = math.exp(logs[j] - top) if j in logs else 0.0
            assert w[r, j].item() == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_rejects_a_non_spc2_batch():
    emb, labels = spc2_batch(pairs=4, classes=2)
    labels = labels.clone()
    labels[1] = 1 - labels[0]
    with pytest.raises(ValueError, match="SPC-2"):
        sample_triplets(emb, labels, "random")
