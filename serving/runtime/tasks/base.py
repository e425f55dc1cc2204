"""The served-task base class and the task registry.

A served task (classification, retrieval, ...) is one :class:`ServedTask` subclass registered with
:func:`register_task`: the registry is the only list of task names. ``ModelSpec.task``, the probe configuration
and the export manifest are validated against it, and export, archive, service loading, probes, metrics, the
monitor and the gate ask the task object instead of branching on its name.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterator, Optional, TypeVar

import numpy as np
from pydantic import AfterValidator

if TYPE_CHECKING:  # only for annotations: the registry is imported by the spec itself
    import torch

    from serving.runtime.artifacts import EvaluationSummary
    from serving.runtime.probing.params import ProbeConfig
    from serving.runtime.spec import ModelSpec, ThreatModel

# (figure, baseline value, candidate value, allowed drop or None: not compared)
GateCheck = tuple[str, float, float, Optional[float]]
# (metric suffix of serving.runtime.probing.metrics.PROBE_METRICS, labels, value)
MetricSample = tuple[str, dict[str, str], float]


class UnknownTask(ValueError):
    """A task name that no :class:`ServedTask` is registered under."""


class ServedTask:
    """One kind of served model: what its spec needs, how it is exported, archived, served and probed, and which
    figures of its probe reports matter.

    Required (no useful default): ``name`` (the serialized ``ModelSpec.task``), ``output`` (the artifact's output
    name), ``clean_metric``, ``default_attacks``, :meth:`probe_attacks`, :meth:`check_spec`, :meth:`service_class`,
    :meth:`clean_score`, :meth:`parity_adversarial`, :meth:`measure`, :meth:`headline`, :meth:`gate_checks`,
    :meth:`summary_lines`, :meth:`metric_samples`.
    Optional (declared here with their defaults): ``title``, ``handler``, ``required_attacks``, ``default_steps``,
    ``default_step``, ``min_probe_n``, :meth:`default_eps`, :meth:`parity_scores`, :meth:`export_files`,
    :meth:`probe_reference`, :meth:`evaluation_summary`, :meth:`stage_archive`.

    Hooks are called on the one registered instance; they keep no state.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # what messages call it ("a retrieval probe ..."); "": the name
    output: ClassVar[str] = ""  # the artifact's output, e.g. "logits" [N, K] or "embedding" [N, D]
    # The TorchServe handler file, relative to the repository root; the default serves any task through its
    # service_class().
    handler: ClassVar[str] = "handlers/served.py"
    clean_metric: ClassVar[str] = ""  # what the start-up self-check measures on the probe set (ProbeCheck.metric)

    # --- probe parameters (serving.runtime.probing.params.resolve) ---------------------------------------------
    default_attacks: ClassVar[tuple[str, ...]] = ()  # a probe request that names none
    required_attacks: ClassVar[tuple[str, ...]] = ()  # always run, placed first, even when not asked for
    default_steps: ClassVar[int] = 20  # attack iterations when a request gives none (capped by the server)
    default_step: ClassVar[Optional[float]] = None  # absolute step size; None: step_ratio * eps
    min_probe_n: ClassVar[int] = 1  # the fewest probe images a probe can measure anything on

    def probe_attacks(self) -> tuple[str, ...]:
        """The attack names an in-server probe of this task may run."""
        raise NotImplementedError

    def default_eps(self, threat_eps: Optional[float], input_size: tuple[int, int]) -> float:
        """The probe radius when a request gives none: the threat model's eps, else 0.1 (L-inf, pixel units)."""
        return threat_eps if threat_eps else 0.1

    # --- the spec ------------------------------------------------------------------------------------------------

    def check_spec(self, spec: "ModelSpec") -> None:
        """Raises ValueError saying which field a spec of this task lacks or gets wrong."""
        raise NotImplementedError

    # --- export (serving.export) -----------------------------------------------------------------------------------

    def parity_adversarial(self, model: "torch.nn.Module", x: "torch.Tensor", y: "torch.Tensor",
                           threat: "ThreatModel", attack: str, steps: int, seed: int) -> "torch.Tensor":
        """Adversarial versions of x [N, C, H, W] in [0, 1] inside ``threat`` (``attack``: "pgd" or "fgsm"), on
        which the exported engines must agree with the eager model."""
        raise NotImplementedError

    def parity_scores(self, out: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Scores [N, M] whose order defines top-1/top-k in the parity check, from outputs [N, ...] and the eager
        model's outputs on the clean parity points. Default: the outputs themselves (logits)."""
        return out

    def export_files(self, spec: "ModelSpec", folder: Path) -> dict[str, str]:
        """Writes this task's extra export files into ``folder``; -> {artifact key: file name}. Default: none."""
        return {}

    def probe_reference(self, evaluation: Optional["EvaluationSummary"], checkpoint: dict
                        ) -> Optional[tuple[float, str]]:
        """(clean score in [0, 1] the model is known to reach, where that figure comes from), comparable with
        :meth:`clean_score`; None: the export measures it. Default: None."""
        return None

    def evaluation_summary(self, report: dict, source: str) -> "EvaluationSummary":
        """The figures of an ``evaluation.json`` (``robustserve evaluate``) for the export manifest."""
        from serving.runtime.artifacts import EvaluationSummary

        return EvaluationSummary(source=source, task=self.name, n=report.get("n"), points=report.get("points"))

    # --- archive (serving.archive) ---------------------------------------------------------------------------------

    def stage_archive(self, stage: Path, build: Any) -> None:
        """Adds this task's files to an archive's staging folder. ``build`` (serving.archive.ArchiveBuild) gives
        ``src``, ``manifest``, ``cfg`` and ``gallery()``. Default: nothing to add."""

    # --- serving -----------------------------------------------------------------------------------------------------

    def service_class(self) -> type:
        """The :class:`serving.runtime.service.ModelService` subclass that serves this task."""
        raise NotImplementedError

    def clean_score(self, outputs: np.ndarray, y: np.ndarray) -> float:
        """Clean score in [0, 1] of model outputs [N, ...] on labelled images y int64 [N] (the start-up
        self-check's figure, ``clean_metric``)."""
        raise NotImplementedError

    # --- probes and their reports --------------------------------------------------------------------------------

    def measure(self, service: Any, module: "torch.nn.Module", cfg: "ProbeConfig", deadline: Optional[float],
                device: str) -> dict:
        """A probe's ``results`` for ``service`` (a ModelService with a probe set), gradients from ``module``."""
        raise NotImplementedError

    def headline(self, results: dict) -> Optional[float]:
        """The SLO figure of a probe's results (what ``robustserve monitor`` holds against the floor), in
        [0, 1]; None when the results hold none."""
        raise NotImplementedError

    def gate_checks(self, base: dict, cand: dict, cfg: Any) -> list[GateCheck]:
        """The figures ``robustserve gate`` compares between two probes' results, with the drop ``cfg``
        (serving.gate.GateConfig) allows each."""
        raise NotImplementedError

    def summary_lines(self, results: dict) -> list[str]:
        """A few lines a person reads: the headline figures of a probe's results."""
        raise NotImplementedError

    def metric_samples(self, results: dict) -> Iterator[MetricSample]:
        """The probe figures as metric samples (besides the run count, duration and timestamp)."""
        raise NotImplementedError


_TASKS: dict[str, ServedTask] = {}
T = TypeVar("T", bound=type)


def register_task(cls: T) -> T:
    """Class decorator: registers a :class:`ServedTask` subclass under its ``name``; the registry is the only list
    of task names."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered")
    if cls.name in _TASKS:
        raise ValueError(f"served task {cls.name!r} registered twice")
    if not cls.title:
        cls.title = cls.name
    _TASKS[cls.name] = cls()
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> ServedTask:
    """The registered task, or UnknownTask naming the registered ones."""
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTask(f"unknown task {name!r}; the registered tasks are {', '.join(task_names())}") from None


def _registered(name: str) -> str:
    get_task(name)
    return name


# A task name in a pydantic model: validated against the registry, serialized as the plain name.
TaskName = Annotated[str, AfterValidator(_registered)]
