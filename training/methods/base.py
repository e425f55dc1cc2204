"""The training-method contract and its registry."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Type

import torch
from torch import nn

from serving.runtime.spec import Frozen, ModelSpec
from training.config import MethodConfig

_METHODS: dict[str, Type["TrainingMethod"]] = {}


class NoOptions(Frozen):
    pass


class TrainingMethod:
    """One training objective.

    Hooks: :meth:`training_step` is required; :meth:`setup`, :meth:`make_loader`, :meth:`state_dict` and
    :meth:`load_state_dict` are optional (their defaults: nothing to set up, the trainer's shuffled batches, no
    state). A new method is one file with a subclass registered by :func:`register_method` (and its import in
    ``training/methods/__init__.py``).

    ``net`` given to :meth:`training_step` is the (possibly DDP-wrapped) training module: ``net(x)`` gives logits
    (classifiers) or embeddings (embedders) and ``net(x, "features")`` gives (fmap, rep, logits) for classifiers (rep: what the output layer consumes).
    Gradients must flow through ``net`` so DDP synchronises them. ``model`` is the bare module: use it for attacks
    (they switch it to eval mode and back).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[Type[Frozen]] = NoOptions
    task: ClassVar[str] = "classification"
    # Whether the method trains against a threat model; only then does the exported spec claim one.
    adversarial: ClassVar[bool] = True

    def __init__(self, cfg: MethodConfig, *, spec: ModelSpec, train_set: Any, device: torch.device,
                 generator: torch.Generator, rank: int = 0, world_size: int = 1, **context: Any):
        self.cfg = cfg
        self.options = self.Options.model_validate(cfg.options)
        self.spec = spec
        self.train_set = train_set
        self.device = device
        self.generator = generator
        self.rank = rank
        self.world_size = world_size
        self.context = context

    def setup(self, model: nn.Module) -> None:
        """Called once before training (e.g. to build a frozen teacher)."""

    def make_loader(self, train_set: Any, cfg: Any, rank: int, world: int) -> Any:
        """The batches to train on (an iterable with ``len``), for a method that needs its own sampling (e.g.
        same-class pairs); ``cfg`` is the TrainConfig. None: the trainer's shuffled batches of
        ``cfg.batch_size``, sharded across the ``world`` ranks."""
        return None

    def training_step(self, net: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """x: [B, C, H, W] in [0, 1]; y: [B] int64. Returns the scalar loss and figures to log."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def register_method(name: str) -> Callable[[Type[TrainingMethod]], Type[TrainingMethod]]:
    def deco(cls: Type[TrainingMethod]) -> Type[TrainingMethod]:
        if name in _METHODS:
            raise ValueError(f"training method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> Type[TrainingMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown training method {name!r}; choose one of {', '.join(list_methods())}")
    return _METHODS[name]


def build_method(cfg: MethodConfig, **kwargs: Any) -> TrainingMethod:
    return method_class(cfg.name)(cfg, **kwargs)
