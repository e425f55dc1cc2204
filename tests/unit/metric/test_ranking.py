"""Every ranking attack improves its own objective on a tiny model and stays in its ball; target selection
follows robrank's rules."""
import pytest
import torch

from serving.runtime.attacks.ranking import RANK_OBJECTIVES, RANK_ATTACKS, rank_attack, select_targets
from serving.runtime.attacks.threat import LpBall
from training.evaluation.embedder_report import embed, measure

BALL = LpBall("linf", eps=0.2, step=0.02)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    return x, y


@pytest.mark.parametrize("name", RANK_ATTACKS)
def test_attack_improves_its_objective_and_stays_in_ball(tiny, data, name):
    x, y = data
    gallery = embed(tiny, x)
    qi = torch.arange(0, 300, 15)  # 20 attacked images
    t = select_targets(name, gallery[qi], qi, y[qi], gallery, y, generator=torch.Generator().manual_seed(1))
    x0 = x[qi].clone()
    x_adv = rank_attack(tiny, name, x[qi], t, BALL, steps=15)
    assert torch.equal(x[qi], x0)  # input not mutated
    assert bool(BALL.contains(x_adv, x0).all())
    with torch.no_grad():
        before = RANK_OBJECTIVES[name](tiny(x0), t)
        after = RANK_OBJECTIVES[name](tiny(x_adv), t)
    assert float(after.mean()) > float(before.mean())
    # and the measured outcome moves the attacker's way
    m0, m1 = measure(name, tiny(x0).detach(), t), measure(name, tiny(x_adv).detach(), t)
    key = next(iter(m0))
    worse_when_higher = name in ("CA-", "QA-", "TMA") or key == "shift"
    if worse_when_higher:
        assert float(m1[key].mean()) > float(m0[key].mean())
    else:
        assert float(m1[key].mean()) < float(m0[key].mean())


def test_selection_rules(tiny, data):
    x, y = data
    gallery = embed(tiny, x)
    qi = torch.arange(0, 300, 7)
    d = torch.cdist(gallery[qi], gallery)
    d[torch.arange(qi.numel()), qi] = float("inf")
    g = torch.Generator().manual_seed(2)
    for name in RANK_ATTACKS:
        t = select_targets(name, gallery[qi], qi, y[qi], gallery, y, generator=g)
        if name in ("CA+", "QA+", "TMA"):
            assert bool((t.target != qi).all())
        if name in ("CA-", "QA-"):  # top 1 % of 300 = the 3 nearest
            top = d.topk(3, dim=1, largest=False).indices
            assert bool((top == t.target.unsqueeze(1)).any(1).all())
        if name == "GTM":  # the nearest item unlike the clean top-1 (not unlike the query)
            for r in range(qi.numel()):
                other = (y != y[int(d[r].argmin())])
                assert t.target[r].item() == int(torch.where(other, d[r], torch.inf).argmin())
        if name == "GTT":
            assert torch.equal(t.target, d.argmin(dim=1))
