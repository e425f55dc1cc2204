import math

import pytest

from training.metric import GradualAdversary, pseudo_hardness
from training.metric.pseudo import BOOST


def test_first_lga_target_is_minus_margin():
    ga = GradualAdversary("lga", margin=0.2)
    assert ga.prev_loss == 2.0
    assert ga.target() == pytest.approx(-0.2)


@pytest.mark.parametrize("loss, target", [(5.0, -0.2), (0.2, -0.2), (0.1, -0.1), (0.05, -0.05), (0.0, 0.0),
                                          (-0.3, 0.0)])
def test_lga_clips_the_previous_loss_at_the_margin(loss, target):
    ga = GradualAdversary("lga", margin=0.2)
    ga.update(loss)
    assert ga.target() == pytest.approx(target)


@pytest.mark.parametrize("loss", [0.0, 0.03, 0.1, 0.17, 0.2, 1.0])
def test_variants_follow_their_formulas(loss):
    u = 0.2
    r = min(max(loss, 0.0), u) / u
    assert pseudo_hardness("lga-square", loss, u) == pytest.approx(-u * r * r)
    assert pseudo_hardness("lga-sqrt", loss, u) == pytest.approx(-u * math.sqrt(r))
    assert pseudo_hardness("lga-boost", loss, u) == pytest.approx(-u * r + BOOST * (1 - r))
    # the stronger adversary (higher target) as the loss falls
    assert pseudo_hardness("lga", loss, u) <= pseudo_hardness("lga", loss / 2, u)


def test_constants_and_errors():
    assert pseudo_hardness(2.0, 0.7) == 2.0
    assert pseudo_hardness(-0.5, 0.0) == -0.5
    with pytest.raises(ValueError):
        pseudo_hardness(2.5, 0.1)
    with pytest.raises(ValueError):
        pseudo_hardness("nope", 0.1)


def test_state_round_trip():
    ga = GradualAdversary("lga")
    ga.update(0.08)
    other = GradualAdversary("lga")
    other.load_state_dict(ga.state_dict())
    assert other.target() == pytest.approx(ga.target()) == pytest.approx(-0.08)
