"""Probe requests, their resolved configuration, and the limits a server enforces."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from serving.runtime.spec import Frozen
from serving.runtime.tasks import TaskName, get_task


class ProbeSettings(Frozen):
    """Limits on probes of one served model (the ``handler.probe`` section of ``model-config.yaml``)."""

    enabled: bool = True
    max_n: int = Field(512, ge=1)  # probe images per probe
    max_steps: int = Field(100, ge=1)  # attack iterations
    max_attacks: int = Field(4, ge=1)
    max_eps_values: int = Field(4, ge=1)
    max_eps: float = Field(0.5, gt=0)  # L-inf, pixel units
    # Requested eps values must be multiples of this (or of 1/255): eps becomes a metric label, and a grid keeps
    # the number of label values bounded (max_eps / eps_grid + 255 * max_eps per attack) whatever clients ask for.
    eps_grid: float = Field(0.001, gt=0)
    timeout_s: float = Field(300.0, gt=0)  # a probe past this stops at its next batch and reports "timeout"
    min_interval_s: float = Field(10.0, ge=0)  # between two probe starts of one model
    batch_size: int = Field(128, ge=1)
    threads: int = Field(1, ge=1)  # torch intra-op threads for the attack; serving keeps its own


def classifier_attacks() -> tuple[str, ...]:
    """The registered classification attacks an in-server probe may run (their ``probe`` flag)."""
    from serving.runtime.attacks import get_attack, list_attacks

    return tuple(a for a in list_attacks() if get_attack(a).probe)


def retrieval_attacks() -> tuple[str, ...]:
    """The ranking attacks (:data:`serving.runtime.attacks.ranking.RANK_ATTACKS`), every one of which a probe
    may run."""
    from serving.runtime.attacks.ranking import RANK_ATTACKS

    return RANK_ATTACKS


class _Strict(BaseModel):
    # Non-finite numbers are refused here too, for hosts that hand over JSON they decoded themselves.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ProbeRequest(_Strict):
    """The ``probe`` object of a probe request. action ``start`` (the default) begins a probe and answers 202 with
    its id; ``status`` answers the report of ``id`` (202 while it runs); ``last`` the newest report."""

    action: Literal["start", "status", "last"] = "start"
    id: Optional[str] = Field(None, pattern=r"^[0-9a-f]{8,32}$")
    attacks: Optional[list[str]] = Field(None, min_length=1)
    eps: Optional[list[float]] = Field(None, min_length=1)
    steps: Optional[int] = Field(None, ge=1)
    step: Optional[float] = Field(None, gt=0)  # absolute step size; None: the task's default (eps / 4, 3/255)
    n: Optional[int] = Field(None, ge=1)  # first n probe images; None: all of them (up to the cap)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class ProbeConfig(Frozen):
    """A probe's resolved attack configuration: with the model and probe-set hashes, what makes it repeatable."""

    task: TaskName
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    steps: int
    step: Optional[float] = None  # None: step_ratio * eps
    step_ratio: float = 0.25
    n: int
    seed: int = 0
    batch_size: int = 128
    norm: Literal["linf"] = "linf"


def resolve(req: ProbeRequest, task: str, threat_eps: Optional[float], input_size: tuple[int, int],
            available: int, limits: ProbeSettings) -> ProbeConfig:
    """A start request -> its full configuration, or InvalidInput saying which limit or value is wrong."""
    from serving.runtime.errors import InvalidInput

    t = get_task(task)
    allowed = t.probe_attacks()
    attacks = tuple(req.attacks) if req.attacks else t.default_attacks
    bad = [a for a in attacks if a not in allowed]
    if bad:
        raise InvalidInput(f"unknown attack(s) {bad} for a {task} model; choose from {list(allowed)}")
    if len(set(attacks)) != len(attacks):
        raise InvalidInput(f"attacks {list(attacks)} name one attack twice")
    attacks = (*(a for a in t.required_attacks if a not in attacks), *attacks)
    if len(attacks) > limits.max_attacks:
        raise InvalidInput(f"{len(attacks)} attacks asked for; this server allows at most {limits.max_attacks}")
    eps = tuple(sorted(set(float(e) for e in req.eps))) if req.eps else (t.default_eps(threat_eps, input_size),)
    def on_grid(e: float, g: float) -> bool:
        return abs(e / g - round(e / g)) < 1e-6

    # Multiples of the grid, or of 1/255 (the customary k/255 radii).
    off_grid = [e for e in eps if not (on_grid(e, limits.eps_grid) or on_grid(e, 1 / 255))]
    if req.eps and off_grid:
        raise InvalidInput(f"eps {off_grid}: values must be multiples of {limits.eps_grid:g} or of 1/255 (they "
                           f"become metric labels); e.g. {round(off_grid[0] / limits.eps_grid) * limits.eps_grid:.6g}")
    if any(not 0 < e <= limits.max_eps for e in eps):
        raise InvalidInput(f"eps {list(eps)}: every value must lie in (0, {limits.max_eps:g}] (L-inf, pixel units "
                           f"of [0, 1] images)")
    if len(eps) > limits.max_eps_values:
        raise InvalidInput(f"{len(eps)} eps values asked for; this server allows at most {limits.max_eps_values}")
    steps = req.steps if req.steps is not None else min(t.default_steps, limits.max_steps)
    if steps > limits.max_steps:
        raise InvalidInput(f"steps {steps} exceeds this server's cap of {limits.max_steps}")
    if available < 1:
        raise InvalidInput("this model's archive holds no probe set; re-export it to probe it")
    n = req.n if req.n is not None else min(available, limits.max_n)
    if n > limits.max_n:
        raise InvalidInput(f"n {n} exceeds this server's cap of {limits.max_n} probe images")
    if n > available:
        raise InvalidInput(f"n {n} exceeds the {available} images of this model's probe set")
    if n < t.min_probe_n:
        raise InvalidInput(f"a {t.title} probe needs at least {t.min_probe_n} images")
    if req.step is not None and req.step > limits.max_eps:
        raise InvalidInput(f"step {req.step:g} exceeds max_eps {limits.max_eps:g}: a step larger than the ball "
                           f"only lands on its surface")
    step = req.step if req.step is not None else t.default_step
    return ProbeConfig(task=task, attacks=attacks, eps=eps, steps=steps, step=step, n=n, seed=req.seed,
                       batch_size=limits.batch_size)
