"""Machinery shared by the gradient attacks: the input gradient, the grad-mode guard, and restarts.

The contract every algorithm here offers its callers (classification attacks, embedding and ranking
attacks, AGKD-BML's batched targeted PGD):

- ``loss_fn(x_adv [B, ...]) -> [B]`` is a per-sample loss to MAXIMISE. Samples must not interact
  (e.g. BatchNorm must be in eval mode), which is what makes a batch equal to its parts.
- ``success_fn(x_adv) -> bool [B]`` (optional) says which samples the attacker has already won. It is
  always called right after ``loss_fn`` on the very same tensor object, so a caller may reuse that
  forward pass (see :class:`serving.runtime.attacks.base.LogitCache`).
- Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so no parameter's
  ``.grad`` is ever written; the algorithms work when the caller is under ``torch.no_grad()`` or
  ``torch.inference_mode()``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from serving.runtime.attacks.threat import LpBall, _per_sample

LossFn = Callable[[torch.Tensor], torch.Tensor]
SuccessFn = Callable[[torch.Tensor], torch.Tensor]
# run(start [B, ...], scored) -> (x_adv [B, ...], loss [B] | None, success [B] | None)
RunFn = Callable[[torch.Tensor, bool], "tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]"]


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on, whatever the caller's mode. Inside ``inference_mode`` enabling grad is not
    enough (inference tensors cannot be saved for backward), so it is switched off too; tensors
    that arrive from inference mode must still be cloned in here before use."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def input_grad(loss_fn: LossFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss [B] (detached) and its gradient with respect to ``x`` only [B, ...]."""
    x = x.detach().requires_grad_(True)
    loss = loss_fn(x)
    if loss.shape != (x.shape[0],):
        raise ValueError(f"loss_fn must return one loss per sample, shape [{x.shape[0]}]; "
                         f"got {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError("loss_fn's output does not depend differentiably on its input: does it run the "
                         "model under torch.no_grad(), detach, or round?")
    # Summing keeps per-sample gradients independent of the batch size (a mean would scale them by 1/B).
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample select: mask [B] bool, a and b [B, ...] -> [B, ...]."""
    return torch.where(_per_sample(mask, a), a, b)


def run_restarts(x0: torch.Tensor, ball: LpBall, run: RunFn, *, restarts: int, random_start: bool,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """Runs ``run`` from ``restarts`` starting points and keeps, per sample, the best run.

    Best = the first run whose success flag is set when ``run`` reports success, otherwise the
    highest loss. All starting points are drawn up front, sample-major (sample 0's restarts, then
    sample 1's, ...), so the generator ends in the same state and every sample gets the same starts
    whatever the batch composition and whether or not later restarts are skipped.

    x0: [B, ...] -> [B, ...].
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 needs random_start=True: without it every restart is the same run")
    b = x0.shape[0]
    if random_start:
        starts = ball.random_start(x0.repeat_interleave(restarts, dim=0), generator)
        starts = starts.reshape(b, restarts, *x0.shape[1:])
    else:
        starts = x0.unsqueeze(1)
    best = best_loss = best_ok = None
    for r in range(restarts):
        x, loss, ok = run(starts[:, r], restarts > 1)
        if restarts == 1:
            return x
        assert loss is not None
        if best is None:
            best, best_loss, best_ok = x, loss, ok
        else:
            take = loss > best_loss
            if ok is not None:
                take = ~best_ok & (ok | take)
                best_ok = best_ok | (take & ok)
            best = where(take, x, best)
            best_loss = torch.where(take, loss, best_loss)
        if best_ok is not None and bool(best_ok.all()):
            break
    return best
