"""Retrieval metrics and attack measurements against brute-force loops; the ERS aggregator."""

import pytest
import torch
import torch.nn.functional as F

from serving.runtime.attacks.ranking import select_targets
from training.evaluation.embedder_report import ERS_TERMS, ers, ers_terms, measure, nmi_kmeans, retrieval_metrics


def _loop_metrics(emb, labels):
    n = len(labels)
    r1 = r2 = ap = apr = 0.0
    for i in range(n):
        d = [(float((emb[i] - emb[j]).norm()), j) for j in range(n) if j != i]
        d.sort()
        rel = [int(labels[j] == labels[i]) for _, j in d]
        r1 += rel[0]
        r2 += int(rel[0] or rel[1])
        hits, s = 0, 0.0
        for k, r in enumerate(rel, 1):
            if r:
                hits += 1
                s += hits / k
        ap += s / max(1, sum(rel))
        R = sum(rel)
        hits, s = 0, 0.0
        for k, r in enumerate(rel[:R], 1):
            if r:
                hits += 1
                s += hits / k
        apr += s / max(1, R)
    return {"R@1": 100 * r1 / n, "R@2": 100 * r2 / n, "mAP": 100 * ap / n, "mAP@R": 100 * apr / n}


def test_benign_metrics_match_loops():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (120,), generator=g)
    emb = F.normalize(torch.randn(120, 6, generator=g) + 0.8 * F.one_hot(labels, 6).float(), dim=1)
    got = retrieval_metrics(emb, labels, chunk=37, nmi=False)
    ref = _loop_metrics(emb, labels)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-3), k


def test_metrics_agree_with_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (200,), generator=g)
    emb = F.normalize(torch.randn(200, 8, generator=g) + F.one_hot(labels, 8).float(), dim=1)
    ours = retrieval_metrics(emb, labels, nmi=False)
    pml = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                             device=torch.device("cpu")).get_accuracy(emb, labels, emb, labels, True)
    assert ours["R@1"] == pytest.approx(100 * pml["precision_at_1"], abs=1e-3)
    assert ours["mAP@R"] == pytest.approx(100 * pml["mean_average_precision_at_r"], abs=1e-3)


def test_nmi_separated_clusters_and_noise():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat_interleave(50)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1) * 10
    emb = centres[labels] + 0.01 * torch.randn(200, 16, generator=g)
    assert nmi_kmeans(emb, labels) == pytest.approx(1.0, abs=1e-6)
    noise = torch.randn(200, 16, generator=g)
    assert nmi_kmeans(noise, labels) < 0.2


def test_rank_percentile_measure_matches_loop():
    g = torch.Generator().manual_seed(3)
    gallery = F.normalize(torch.randn(50, 5, generator=g), dim=1)
    labels = torch.randint(0, 3, (50,), generator=g)
    qi = torch.tensor([0, 7, 21])
    e_adv = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    for name in ("CA+", "QA+"):
        t = select_targets(name, gallery[qi], qi, labels[qi], gallery, labels, generator=g)
        got = measure(name, e_adv, t)["prank"]
        for r in range(3):
            j = t.target[r].item()
            others = range(50)  # robrank ranks against the whole gallery, the row's own item included
            if name == "CA+":
                a = float((e_adv[r] - gallery[j]).norm())
                before = sum(float((gallery[k] - gallery[j]).norm()) < a for k in others)
            else:
                a = float((e_adv[r] - gallery[j]).norm())
                before = sum(float((e_adv[r] - gallery[k]).norm()) < a for k in others)
            assert got[r].item() == pytest.approx(100 * before / len(others), abs=1e-4)


def test_recall_after_attack_excludes_self():
    gallery = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1])
    qi = torch.tensor([0])
    t = select_targets("ES", gallery[qi], qi, labels[qi], gallery, labels)
    # the adversarial query sits on its own clean embedding: its own item must not count as the hit
    e = gallery[[0]] * 0.9 + gallery[[2]] * 0.1
    assert measure("ES", F.normalize(e, dim=1), t)["r1"].item() == 0.0


def test_ers_of_the_papers_cub_row():
    values = (15.5, 37.7, 16.6, 30.9, 0.753, 0.506, 17.9, 16.7, 27.3, 2.9)
    raw = dict(zip(ERS_TERMS, values))
    assert round(ers(raw), 1) == 36.0
    terms = ers_terms(raw)
    assert terms["CA+"] == pytest.approx(31.0) and terms["ES:D"] == pytest.approx(74.7)
    assert terms["TMA"] == pytest.approx(24.7)


def test_ers_bounds():
    worst = dict(zip(ERS_TERMS, (0.0, 100.0, 0.0, 100.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0)))
    best = dict(zip(ERS_TERMS, (50.0, 0.0, 50.0, 0.0, 0.0, 0.0, 100.0, 100.0, 100.0, 100.0)))
    assert ers(worst) == pytest.approx(0.0) and ers(best) == pytest.approx(100.0)
