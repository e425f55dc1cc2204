"""Each ranking objective, pair rule and measurement pinned on hand-made galleries of 2-D unit embeddings,
against values worked out by hand from the geometry (robrank's definitions; see serving/runtime/attacks/ranking.py).

Between unit vectors at angles a and b (degrees) the Euclidean distance is the chord 2 sin(|a - b| / 2).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serving.runtime.attacks.ranking import RANK_OBJECTIVES, RankTargets, rank_attack, select_targets
from serving.runtime.attacks.threat import LpBall
from serving.runtime.evaluation.retrieval import ers, ers_terms, measure, standard_error


def unit(*degrees: float) -> torch.Tensor:
    r = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([r.cos(), r.sin()], dim=1).float()


def chord(deg: float) -> float:
    return 2.0 * math.sin(math.radians(deg) / 2.0)


# G: 0 and 60 degrees (class 0), 90 and 180 (class 1), 270 (class 2).
G = unit(0, 60, 90, 180, 270)
Y = torch.tensor([0, 0, 1, 1, 2])
R2 = math.sqrt(2.0)


def targets(self_idx: int, target: int, label: int = 0, orig: torch.Tensor = G[[0]]) -> RankTargets:
    return RankTargets(G, Y, torch.tensor([self_idx]), torch.tensor([label]), orig, torch.tensor([target]))


def value(name: str, e: torch.Tensor, t: RankTargets) -> float:
    return float(RANK_OBJECTIVES[name](e, t))


def test_candidate_attack_objectives_and_percentiles():
    t = targets(self_idx=0, target=2)  # candidate c = item 0 (0 deg), query q = item 2 (90 deg)
    # d(c, q) = sqrt 2; d(x, q) over G = sqrt 2, chord 30, 0, sqrt 2, 2: three hinge terms of five are active,
    # the query itself among them (robrank averages over the whole gallery).
    assert value("CA+", G[[0]], t) == pytest.approx(-(R2 - chord(30) + R2) / 5, abs=1e-5)
    assert float(measure("CA+", G[[0]], t)["prank"]) == pytest.approx(100 * 2 / 5)  # 60 and 90 deg are nearer
    t = targets(self_idx=0, target=1)  # q = item 1 (60 deg); d(c, q) = 1; d(x, q) = 1, 0, chord 30, sqrt 3, chord 150
    assert value("CA-", G[[0]], t) == pytest.approx(-(math.sqrt(3) - 1 + chord(150) - 1) / 5, abs=1e-5)
    # c moved opposite q (240 deg) is the farthest item from q: no CA- hinge term is left, all 5 come first
    assert value("CA-", unit(240), t) == pytest.approx(0.0, abs=1e-5)
    assert float(measure("CA-", unit(240), t)["prank"]) == pytest.approx(100.0)


def test_query_attack_objectives_and_percentiles():
    # q = item 0 at 0 deg: d(q, x) over G = 0, 1, sqrt 2, 2, sqrt 2
    t = targets(self_idx=0, target=2)  # QA+ candidate at 90 deg: d = sqrt 2
    assert value("QA+", G[[0]], t) == pytest.approx(-(R2 + (R2 - 1)) / 5, abs=1e-5)
    assert float(measure("QA+", G[[0]], t)["prank"]) == pytest.approx(100 * 2 / 5)  # 0 and 60 deg before it
    t = targets(self_idx=0, target=1)  # QA- candidate at 60 deg: d = 1
    assert value("QA-", G[[0]], t) == pytest.approx(-((R2 - 1) + 1 + (R2 - 1)) / 5, abs=1e-5)
    assert float(measure("QA-", G[[0]], t)["prank"]) == pytest.approx(100 * 1 / 5)  # only the query's own item
    # GTT is QA- about the clean top-1: the same value
    assert value("GTT", G[[0]], t) == pytest.approx(value("QA-", G[[0]], t))


def test_tma_es_gtm_values():
    t = targets(self_idx=0, target=2)
    assert value("TMA", unit(45), t) == pytest.approx(math.cos(math.radians(45)), abs=1e-6)
    assert value("ES", unit(60), t) == pytest.approx(1.0, abs=1e-3)  # the shift from 0 to 60 deg
    assert value("GTM", unit(45), t) == pytest.approx(-chord(45), abs=1e-5)


def test_ltm_is_robranks_hinge_without_the_query_itself():
    # query (class 0, item 0) perturbed to 20 deg: farthest other-class item 180 deg (chord 160), nearest
    # own-class item other than itself 60 deg (chord 40); its own item at 0 deg (chord 20) is left out.
    t = targets(self_idx=0, target=-1)
    assert value("LTM", unit(20), t) == pytest.approx(-(chord(160) - chord(40)), abs=1e-5)
    # a class-1 query (item 3, 180 deg) at 170 deg: its own item (chord 10) would be the nearest own-class one;
    # left out, that is 90 deg (chord 80). The farthest other-class item is 0 deg (chord 170).
    t1 = targets(self_idx=3, target=-1, label=1, orig=G[[3]])
    assert value("LTM", unit(170), t1) == pytest.approx(-(chord(170) - chord(80)), abs=1e-5)


def test_pair_rules():
    self_idx = torch.tensor([0])
    # GTM: a query (class 0) whose clean top-1 is the class-1 item at 90 deg: the target is the nearest item
    # whose label differs from that top-1's, here the class-0 item at 60 deg, not the class-1 one.
    q = unit(100)
    t = select_targets("GTM", q, torch.tensor([-1]), torch.tensor([0]), G, Y)
    assert t.target.item() == 1
    # GTT: the clean top-1 with the query's own item left out
    assert select_targets("GTT", G[[0]], self_idx, Y[:1], G, Y).target.item() == 1
    # CA-/QA-: top 1 % of 5 items is the single nearest other item
    for name in ("CA-", "QA-"):
        assert select_targets(name, G[[0]], self_idx, Y[:1], G, Y, torch.Generator().manual_seed(0)).target.item() == 1
    # CA+/QA+/TMA: uniform over the gallery but never the row itself
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([select_targets("QA+", G[[0]].repeat(400, 1), self_idx.repeat(400), Y[:1].repeat(400), G, Y,
                                      g).target])
    assert 0 not in drawn.tolist() and set(drawn.tolist()) == {1, 2, 3, 4}


class Direction(nn.Module):
    """[B, 1, 1, 2] images in [0, 1] -> the unit direction of (pixels - 0.5): every angle is reachable."""

    def forward(self, x):
        return F.normalize(x.flatten(1) - 0.5, dim=1)


# Class 0 at 0 and 20 deg, class 1 at 70, 75, 80, 85, 90 deg; the query is item 0, the image (1, 0.5).
G2 = unit(0, 20, 70, 75, 80, 85, 90)
Y2 = torch.tensor([0, 0, 1, 1, 1, 1, 1])
BIG = LpBall("linf", eps=1.0, step=0.05)


@pytest.mark.parametrize("name, key, before, after", [
    # GTM: the clean top-1 (20 deg) is class 0, so the target is the nearest class-1 item, 70 deg; the query
    # is pulled onto it and its top-1 (itself left out) becomes class 1.
    ("GTM", "r1", 100.0, 0.0),
    # LTM's hinge is 0 only where all five class-1 items are nearer than 20 deg (between 55 and 225 deg);
    # there the top-1 is class 1.
    ("LTM", "r1", 100.0, 0.0),
    # GTT and QA- reach their maximum, 0, only where 20 deg is the farthest of all seven items (between 190
    # and 225 deg): it leaves the top 4, and the 6 others (the query's own item too) come before it.
    ("GTT", "kept", 100.0, 0.0),
    ("QA-", "prank", 100 * 1 / 7, 100 * 6 / 7),
])
def test_attack_moves_the_ranking_as_worked_out(name, key, before, after):
    model = Direction()
    x = torch.tensor([[[[1.0, 0.5]]]])
    t = select_targets(name, G2[[0]], torch.tensor([0]), Y2[:1], G2, Y2, torch.Generator().manual_seed(0))
    assert t.target.item() == {"GTM": 2, "LTM": -1}.get(name, 1)
    assert float(measure(name, model(x), t)[key]) == pytest.approx(before, abs=1e-4)
    x_adv = rank_attack(model, name, x, t, BIG, steps=40)
    assert float(RANK_OBJECTIVES[name](model(x_adv), t)) > float(RANK_OBJECTIVES[name](model(x), t))
    assert float(measure(name, model(x_adv), t)[key]) == pytest.approx(after, abs=1e-4)


@pytest.mark.parametrize("name, key, pair, before, after", [
    # CA+: the candidate (item 0) reaches its maximum only within 2.5 deg of the query at 90 deg, where only
    # the query itself is nearer to the query: 6 of 7 items come first before, 1 after.
    ("CA+", "prank", 6, 100 * 6 / 7, 100 * 1 / 7),
    # CA-: the query is the candidate's nearest item (20 deg); the maximum needs the candidate more than
    # 70 deg from it, beyond every item, so all 7 (its own clean item too) come first.
    ("CA-", "prank", 1, 100 * 1 / 7, 100.0),
    # QA+ with the 20 deg candidate: before it comes only the query's own item (0 deg); the maximum needs the
    # query nearer to 20 deg than to 0 and to 70 deg (between 10 and 45 deg), where nothing comes first.
    # (Towards a candidate at 90 deg the four items between pull back: sign PGD stalls at 55 deg, a local
    # maximum of robrank's objective.)
    ("QA+", "prank", 1, 100 * 1 / 7, 0.0),
])
def test_pair_attack_moves_the_ranking_as_worked_out(name, key, pair, before, after):
    model = Direction()
    x = torch.tensor([[[[1.0, 0.5]]]])
    t = select_targets(name, G2[[0]], torch.tensor([0]), Y2[:1], G2, Y2, torch.Generator().manual_seed(0))
    t.target = torch.tensor([pair])  # the uniform draws fixed to one pair
    assert float(measure(name, model(x), t)[key]) == pytest.approx(before, abs=1e-4)
    x_adv = rank_attack(model, name, x, t, LpBall("linf", eps=1.0, step=0.01), steps=200)
    assert float(measure(name, model(x_adv), t)[key]) == pytest.approx(after, abs=1e-4)


def test_tma_and_es_reach_what_the_geometry_allows():
    model = Direction()
    x = torch.tensor([[[[1.0, 0.5]]]])
    ball = LpBall("linf", eps=1.0, step=0.01)
    t = select_targets("TMA", G2[[0]], torch.tensor([0]), Y2[:1], G2, Y2, torch.Generator().manual_seed(0))
    t.target = torch.tensor([6])
    # TMA: from cosine 0 with the 90 deg target to (nearly) 1
    assert float(measure("TMA", model(x), t)["cos"]) == pytest.approx(0.0, abs=1e-6)
    assert float(measure("TMA", model(rank_attack(model, "TMA", x, t, ball, steps=200)), t)["cos"]) > 0.999
    # ES: the farthest point from 0 deg is 180 deg (shift 2), where the nearest other item is class 1 (90 deg)
    t = select_targets("ES", G2[[0]], torch.tensor([0]), Y2[:1], G2, Y2)
    m = measure("ES", model(rank_attack(model, "ES", x, t, ball, steps=200)), t)
    assert float(m["shift"]) > 1.99 and float(m["r1"]) == 0.0


def test_ers_terms_follow_robranks_normalisation_unclipped():
    raw = {"CA+": 60.0, "CA-": 10.0, "QA+": 5.0, "QA-": 20.0, "TMA": -0.5, "ES:D": 0.4, "ES:R": 30.0,
           "LTM": 40.0, "GTM": 50.0, "GTT": 70.0}
    terms = ers_terms(raw)
    assert terms == pytest.approx({"CA+": 120.0, "CA-": 90.0, "QA+": 10.0, "QA-": 80.0, "TMA": 150.0,
                                   "ES:D": 80.0, "ES:R": 30.0, "LTM": 40.0, "GTM": 50.0, "GTT": 70.0})
    assert ers(raw) == pytest.approx(72.0)


def test_standard_error():
    # mean 50, sample variance 4 * 2500 / 3, so SE = sqrt(10000 / 3) / 2
    assert standard_error(torch.tensor([0.0, 100.0, 100.0, 0.0])) == pytest.approx(math.sqrt(10000 / 3) / 2)
    assert standard_error(torch.tensor([7.0])) == 0.0


def test_suite_reports_each_terms_standard_error():
    from serving.runtime.evaluation.retrieval import ERS_TERMS, RankProfile, attack_queries
    from training.evaluation.embedder_report import format_table

    # three queries (the images at 0, 45 and 90 deg) against G2, two steps: enough to fill every field
    x = torch.tensor([[[[1.0, 0.5]]], [[[1.0, 1.0]]], [[[0.5, 1.0]]]])
    y = torch.tensor([0, 1, 1])
    out = attack_queries(Direction(), x, y, torch.tensor([0, -1, 6]), G2, Y2,
                         RankProfile(name="t", eps=0.1, step=0.05, steps=2))
    assert set(out["terms_se"]) == set(ERS_TERMS) and out["queries"] == 3
    assert all(v >= 0 for v in out["terms_se"].values()) and out["ERS_se"] is not None
    report = {"benign": {"R@1": 1.0}, "gallery": 7, "profile": {"name": "t", "eps": 0.1, "steps": 2}, "queries": 3,
              "attacks": out["raw"], "terms": out["terms"], "terms_se": out["terms_se"], "ERS": out["ERS"],
              "ERS_se": out["ERS_se"]}
    table = format_table(report)
    assert " SE" in table and f"{out['terms_se']['GTT']:.2f}" in table and f"{out['ERS_se']:.2f} (SE)" in table
