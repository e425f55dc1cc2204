"""Every objective against a slow, obviously-correct per-sample loop."""
from __future__ import annotations

import math

import pytest
import torch

from serving.runtime.attacks import OBJECTIVES

DTYPES = [torch.float32, torch.float64]


def oracle(name: str, z: list[float], y: int, t: int) -> float:
    k = len(z)
    desc = sorted(z, reverse=True)
    lse = math.log(sum(math.exp(v) for v in z))
    best_not = lambda c: max(z[i] for i in range(k) if i != c)  # noqa: E731
    if name == "ce":
        return lse - z[y]
    if name == "targeted_ce":
        return -(lse - z[t])
    if name == "cw":
        return best_not(y) - z[y]
    if name == "targeted_cw":
        return z[t] - best_not(t)
    if name == "dlr":
        return -(z[y] - best_not(y)) / (desc[0] - desc[2] + 1e-12)
    if name == "targeted_dlr":
        return -(z[y] - z[t]) / (desc[0] - 0.5 * (desc[2] + desc[3]) + 1e-12)
    raise KeyError(name)


def sample(dtype, b=24, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(b, k, generator=g)).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    t = (y + torch.randint(1, k, (b,), generator=g)) % k
    # Make some true classes the top logit, so both branches of "max over k != y" are exercised.
    z[::3] = z[::3].scatter(1, y[::3, None], z[::3].amax(1, keepdim=True) + 1)
    return z, y, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_matches_loop_oracle(name, dtype):
    z, y, t = sample(dtype)
    obj = OBJECTIVES[name]
    got = obj(z, y, t if obj.targeted else None)
    assert got.shape == (len(z),) and got.dtype == dtype
    want = torch.tensor([oracle(name, z[i].tolist(), int(y[i]), int(t[i])) for i in range(len(z))], dtype=torch.float64)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["cw", "dlr"])
def test_untargeted_margins_are_positive_exactly_when_misclassified(name):
    z, y, _ = sample(torch.float64, b=200)
    wrong = z.argmax(1) != y
    assert torch.equal(OBJECTIVES[name](z, y) > 0, wrong)


def test_targeted_margin_positive_exactly_when_target_wins():
    z, y, t = sample(torch.float64, b=200)
    z[::2] = z[::2].scatter(1, t[::2, None], z[::2].amax(1, keepdim=True) + 0.5)
    assert torch.equal(OBJECTIVES["targeted_cw"](z, y, t) > 0, z.argmax(1) == t)


def test_dlr_is_invariant_to_shift_and_positive_scale():
    z, y, t = sample(torch.float64)
    for name, tt in (("dlr", None), ("targeted_dlr", t)):
        a = OBJECTIVES[name](z, y, tt)
        b = OBJECTIVES[name](3.0 * z + 7.0, y, tt)
        assert torch.allclose(a, b, atol=1e-9)


def test_gradients_flow_to_logits():
    z, y, t = sample(torch.float64)
    for name, obj in OBJECTIVES.items():
        zz = z.clone().requires_grad_(True)
        obj(zz, y, t if obj.targeted else None).sum().backward()
        assert torch.isfinite(zz.grad).all() and zz.grad.abs().sum() > 0, name


def test_contract_errors_say_what_is_wrong():
    z, y, t = sample(torch.float32, k=10)
    with pytest.raises(ValueError, match="targeted"):
        OBJECTIVES["targeted_ce"](z, y, None)
    with pytest.raises(ValueError, match="untargeted"):
        OBJECTIVES["ce"](z, y, t)
    with pytest.raises(ValueError, match="at least 4"):
        OBJECTIVES["targeted_dlr"](z[:, :3], y % 3, t % 3)
    with pytest.raises(ValueError, match="at least 3"):
        OBJECTIVES["dlr"](z[:, :2], y % 2)
    with pytest.raises(ValueError, match="int64"):
        OBJECTIVES["ce"](z, y.float())
    # Targeted CE and CW do not need the true labels.
    assert OBJECTIVES["targeted_ce"](z, None, t).shape == (len(z),)
