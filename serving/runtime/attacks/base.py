"""The classification-attack base class and the attack registry.

Every attack's ``__call__`` does the same things (eval mode and restore, no input mutation, no
parameter gradients, detached output inside the ball and box); a subclass writes only
:meth:`Attack.perturb`.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, ClassVar, Iterator, Optional, TypeVar, Union

import torch
from torch import nn

from serving.runtime.spec import ThreatModel
from serving.runtime.attacks.core import grad_enabled
from serving.runtime.attacks.objectives import Objective
from serving.runtime.attacks.threat import LpBall


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts every submodule in eval mode and restores each one's own flag afterwards, even on error.

    Restoring per submodule (not ``model.train(was_training)``) keeps deliberately mixed modes intact,
    e.g. the frozen-BatchNorm embedders of hardness manipulation, trained with BN in eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


class LogitCache:
    """A model call that remembers its last input, so ``success_fn`` reuses ``loss_fn``'s forward pass.

    The algorithms call ``success_fn`` right after ``loss_fn`` on the same input (possibly a detached alias of
    it); the cached logits are detached so no graph outlives its backward pass. ``hits``/``misses`` count the
    success checks answered from the cache and by a fresh forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key: Optional[tuple] = None
        self._logits: Optional[torch.Tensor] = None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key_of(x: torch.Tensor) -> tuple:
        # The gradient helpers call the model on ``x.detach().requires_grad_()``, a different tensor object
        # over the same memory: identify the input by its storage, layout and in-place version instead.
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self._key, self._logits = self._key_of(x), logits.detach()
        return logits

    def detached(self, x: torch.Tensor) -> torch.Tensor:
        if self._logits is not None and self._key == self._key_of(x):
            self.hits += 1
            return self._logits
        self.misses += 1
        with torch.no_grad():
            return self.model(x)


def classifier_success(cache: LogitCache, y: torch.Tensor, target: Optional[torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Untargeted success: prediction != y. Targeted success: prediction == target. -> bool [B]."""
    if target is None:
        return lambda xa: cache.detached(xa).argmax(dim=1) != y
    return lambda xa: cache.detached(xa).argmax(dim=1) == target


class Attack:
    """Base of the classification attacks: ``attack(x, y, target=None) -> x_adv``.

    The model is any ``nn.Module`` mapping images [B, C, H, W] in [lo, hi] (pixel units, usually
    [0, 1]; normalisation is the model's first layer) to logits [B, K].

    ``__call__`` guarantees, for every attack:
      - the model runs in eval mode during the attack; each submodule's train/eval flag is restored
        afterwards, also on exception;
      - ``x``, ``y`` and ``target`` are never modified; the result is a new, detached tensor;
      - parameter gradients are untouched (a ``None`` ``.grad`` stays ``None``): only input gradients
        are taken;
      - the result lies in the ball around ``x`` and in the box;
      - it works under ``torch.no_grad()`` and ``torch.inference_mode()``;
      - randomness comes only from ``self.generator``: two attacks built with the same seed give the
        same adversarial examples for the same sequence of calls.

    Args:
        model: the classifier.
        ball: the threat model (norm, eps, step, box).
        seed: seeds a fresh CPU ``torch.Generator`` when ``generator`` is None. Default 0.
        generator: a generator to draw from instead (it advances across calls).

    A subclass registered with :func:`register_attack` sets ``name`` (the registry key, lower case),
    ``title`` (the display name before the step budget) and ``probe`` (whether an in-server probe may run
    it); its defaults (``steps``, ...) are read from its constructor's signature. An attack whose
    constructor takes no ``steps`` takes exactly one step and no restarts.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    probe: ClassVar[bool] = True

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The constructor's options with their defaults (``steps`` is 1 for a one-step attack); the model,
        the ball and the randomness (``seed``, ``generator``) are not options."""
        out = {"steps": 1}
        for p in list(inspect.signature(cls.__init__).parameters.values())[3:]:
            if p.name not in ("seed", "generator") and p.default is not inspect.Parameter.empty:
                out[p.name] = p.default
        return out

    @classmethod
    def takes(cls, option: str) -> bool:
        """Whether the constructor takes ``option`` (e.g. 'steps', 'restarts', 'n_target_classes')."""
        return option in inspect.signature(cls.__init__).parameters

    @classmethod
    def label(cls, steps: Optional[int] = None, *, restarts: int = 1, num_classes: Optional[int] = None,
              **options: Any) -> str:
        """The display name with the step budget, e.g. 'PGD-20' ('FGSM' for a one-step attack), with
        ', 5 restarts' when it restarts; ``steps`` None is the attack's default. ``num_classes``: the model's
        classes (K), for attacks whose budget depends on them; other options are this attack's own."""
        if not cls.takes("steps"):
            return cls.title
        out = cls.budget(cls.defaults()["steps"] if steps is None else steps, num_classes, **options)
        return out + (f", {restarts} restarts" if restarts > 1 else "")

    @classmethod
    def budget(cls, steps: int, num_classes: Optional[int] = None, **options: Any) -> str:
        """The label's budget part: '<title>-<steps>'. Overridden by attacks whose budget has more factors."""
        return f"{cls.title}-{steps}"

    def __init__(self, model: nn.Module, ball: LpBall, *, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(ball, LpBall):
            raise TypeError(f"ball must be an LpBall (LpBall.from_threat(threat_model)), got {type(ball).__name__}")
        self.model = model
        self.ball = ball
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, C, H, W] float in the box; y: [B] int64; target: [B] int64 for targeted objectives.
        Returns x_adv: [B, C, H, W], same dtype and device as x."""
        check_inputs(x, y, target, self.ball)
        with eval_mode(self.model), grad_enabled():
            x0 = x.detach().clone()
            y0 = y.detach().clone()
            t0 = None if target is None else target.detach().clone()
            x_adv = self.perturb(x0, y0, t0)
        return x_adv.detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """The algorithm. Called in eval mode with grad enabled on private copies of the inputs."""
        raise NotImplementedError

    def __repr__(self) -> str:
        b = self.ball
        return f"{type(self).__name__}(norm={b.norm}, eps={b.eps:g}, step={b.step:g})"


def check_inputs(x: torch.Tensor, y: Optional[torch.Tensor], target: Optional[torch.Tensor], ball: LpBall) -> None:
    if not torch.is_floating_point(x) or x.dim() < 2:
        raise ValueError(f"x must be a float tensor [B, ...], got {x.dtype} {tuple(x.shape)}")
    for what, t in (("y", y), ("target", target)):
        if t is not None and (t.shape != (x.shape[0],) or t.dtype != torch.int64):
            raise ValueError(f"{what} must be int64 of shape [{x.shape[0]}], got {t.dtype} {tuple(t.shape)}")
    if x.numel() and (float(x.min()) < ball.lo or float(x.max()) > ball.hi):
        raise ValueError(f"x must lie in [{ball.lo}, {ball.hi}] (pixel units); got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]. Normalisation belongs inside the model.")


def check_target(objective: Objective, target: Optional[torch.Tensor]) -> None:
    if objective.targeted and target is None:
        raise ValueError(f"objective {objective.name!r} is targeted: pass target (int64 [B])")
    if not objective.targeted and target is not None:
        raise ValueError(f"objective {objective.name!r} is untargeted: pass no target, or pick a targeted objective")


# --- registry -----------------------------------------------------------------------------------

A = TypeVar("A", bound=type[Attack])
_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: A) -> A:
    """Class decorator: registers an :class:`Attack` subclass under its ``name``; the registry is the only list
    of attack names (configs, probes and tests read it)."""
    if not cls.name or not cls.title:
        raise ValueError(f"{cls.__name__} needs a name and a title to be registered")
    if cls.name in _ATTACKS:
        raise ValueError(f"attack {cls.name!r} registered twice")
    _ATTACKS[cls.name] = cls
    return cls


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def get_attack(name: str) -> type[Attack]:
    """The registered attack class, or ValueError naming the registered ones."""
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(list_attacks())}")
    return _ATTACKS[name]


def build_attack(name: str, model: nn.Module, threat: Union[ThreatModel, LpBall], steps: Optional[int] = None,
                 restarts: int = 1, seed: int = 0, **kw: Any) -> Attack:
    """Builds a registered attack.

    Args:
        name: one of :func:`list_attacks` ('apgd-ce', 'apgd-dlr', 'apgd-t', 'cw', 'fgsm', 'pgd').
        model: classifier, [0, 1] images [B, C, H, W] -> logits [B, K].
        threat: the threat model; its ``step`` is the step of 'pgd' and 'cw' (FGSM steps by eps,
            APGD sets its own schedule from 2 * eps).
        steps: iterations; None for the attack's default (its constructor's; a one-step attack takes 1).
        restarts: random restarts (a one-step attack: only 1).
        seed: seeds the attack's generator (ignored when ``generator=`` is passed in ``kw``).
        kw: attack-specific options (e.g. ``objective=`` for 'pgd', ``n_target_classes=`` for 'apgd-t').
    """
    cls = get_attack(name)
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not cls.takes("steps"):
        if steps not in (None, 1) or restarts != 1:
            raise ValueError(f"{name} takes exactly one step and no restarts; got steps={steps}, "
                             f"restarts={restarts}")
    else:
        if steps is not None:
            kw["steps"] = steps
        kw["restarts"] = restarts
    ball = threat if isinstance(threat, LpBall) else LpBall.from_threat(threat)
    return cls(model, ball, seed=seed, **kw)
