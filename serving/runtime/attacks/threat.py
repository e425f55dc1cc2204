"""The threat model of every attack: an L-p ball around the clean input, intersected with the pixel box.

Projection, clamping, random starts and the ascent step live here and nowhere else, so every
algorithm (FGSM, PGD, APGD, and the embedding/ranking attacks built on the same core) stays inside
exactly the same set of admissible inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from serving.runtime.spec import ThreatModel

Norm = Literal["linf", "l2"]
Step = Union[float, torch.Tensor]

# Guards the L2 divisions: a zero gradient or a zero perturbation must give a zero step, not NaN.
_TINY = 1e-12


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts against ``like`` ([B, ...])."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm: [B, ...] -> [B]."""
    return t.flatten(1).norm(p=2, dim=1)


@dataclass(frozen=True)
class LpBall:
    """An L-inf or L2 ball of radius ``eps`` around each clean sample, inside the box [lo, hi].

    All values are in pixel units of images in [0, 1] (normalisation is the model's first layer).
    Tensors are [B, ...] (usually [B, C, H, W]); every operation acts on each sample independently,
    so a batch gives the same result as its rows one at a time.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the ball, >= 0.
        step: default ascent step size, >= 0 (signed step for L-inf, L2 length for L2).
        lo, hi: the box every output is clamped to. Default 0.0, 1.0.
    """

    norm: Norm
    eps: float
    step: float
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be finite and >= 0 (pixel units), got {self.eps}")
        if not (math.isfinite(self.step) and self.step >= 0):
            raise ValueError(f"step must be finite and >= 0 (pixel units), got {self.step}")
        if not self.lo < self.hi:
            raise ValueError(f"the box needs lo < hi, got [{self.lo}, {self.hi}]")

    @classmethod
    def from_threat(cls, threat: ThreatModel, step: Optional[float] = None, lo: float = 0.0,
                    hi: float = 1.0) -> "LpBall":
        """The ball of a :class:`ThreatModel`; ``step`` overrides ``threat.step`` when given."""
        return cls(threat.norm, float(threat.eps), float(threat.step if step is None else step), lo, hi)

    def with_step(self, step: float) -> "LpBall":
        return LpBall(self.norm, self.eps, float(step), self.lo, self.hi)

    def distance(self, x_adv: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample distance in this ball's norm: [B, ...] x 2 -> [B]."""
        d = (x_adv - x0).flatten(1)
        return d.abs().amax(dim=1) if self.norm == "linf" else d.norm(p=2, dim=1)

    def project(self, x_adv: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Nearest point of the ball around ``x0``, then clamped to the box.

        Clamping after the ball projection cannot leave the ball when ``x0`` is in the box: it only
        moves coordinates toward ``x0``. x_adv, x0: [B, ...] -> [B, ...].
        """
        delta = x_adv - x0
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = _flat_norm(delta)
            scale = torch.clamp(self.eps / n.clamp_min(_TINY), max=1.0)
            delta = delta * _per_sample(scale, delta)
        return (x0 + delta).clamp(self.lo, self.hi)

    def random_start(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A uniform random point of the ball around each sample, clamped to the box.

        L-inf: each coordinate uniform in [-eps, eps]. L2: uniform in the ball's volume (Gaussian
        direction, radius eps * U^(1/d)). Noise is drawn from ``generator`` (or the global RNG of
        ``x0``'s device when None) **one sample at a time, in batch order**, on the generator's
        device, then moved to ``x0.device``. Drawing per sample makes the stream independent of how
        samples are grouped: a batch [a; b] draws exactly what ``a`` then ``b`` draw from the same
        generator, whatever the RNG kernel does with large tensors (CPU ``randn`` is not
        prefix-consistent, CUDA Philox offsets grow per call). x0: [B, ...] -> [B, ...].
        """
        b, d = x0.shape[0], x0[0].numel()
        dev = generator.device if generator is not None else x0.device
        dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
        rows = []
        for _ in range(b):
            if self.norm == "linf":
                u = torch.rand(d, generator=generator, device=dev, dtype=dtype)
                rows.append((2 * u - 1) * self.eps)
            else:
                g = torch.randn(d, generator=generator, device=dev, dtype=dtype)
                r = torch.rand(1, generator=generator, device=dev, dtype=dtype)
                rows.append(g / g.norm().clamp_min(_TINY) * (self.eps * r.pow(1.0 / d)))
        if not rows:
            return x0.clone()
        noise = torch.stack(rows).to(device=x0.device, dtype=x0.dtype).reshape(x0.shape)
        return self.project(x0 + noise, x0)

    def ascend(self, x: torch.Tensor, grad: torch.Tensor, step: Optional[Step] = None) -> torch.Tensor:
        """One steepest-ascent step of the norm, without projection.

        L-inf: ``x + step * sign(grad)``. L2: ``x + step * grad / ||grad||_2`` per sample (a zero
        gradient gives no move). ``step``: a float, a per-sample tensor [B], or None for
        ``self.step``. x, grad: [B, ...] -> [B, ...].
        """
        step = self.step if step is None else step
        if isinstance(step, torch.Tensor):
            step = _per_sample(step.to(device=x.device, dtype=x.dtype), x)
        if self.norm == "linf":
            return x + step * grad.sign()
        unit = grad / _per_sample(_flat_norm(grad).clamp_min(_TINY), grad)
        return x + step * unit

    def contains(self, x_adv: torch.Tensor, x0: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample membership, bool [B]: within eps + tol of ``x0`` and within tol of the box."""
        in_ball = self.distance(x_adv, x0) <= self.eps + tol
        flat = x_adv.flatten(1)
        in_box = (flat >= self.lo - tol).all(dim=1) & (flat <= self.hi + tol).all(dim=1)
        return in_ball & in_box
