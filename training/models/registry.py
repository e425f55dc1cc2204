"""The model registry: named builders that return a module together with its ModelSpec.

A builder is a plain function whose keyword parameters are the model's options, with their defaults
as the single source of truth. Every builder takes ``channels``, ``input_size``, ``mean`` and ``std``,
plus ``num_classes`` (a classifier) or ``embedding_dim`` (an embedder); that head option is what
decides the task. ``class_names`` is handled here and never reaches the builder.

``build_model(name, **options)`` is deterministic in its options (not in its random weights), so a
checkpoint that stores the options it was built with can always rebuild the same architecture.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from serving.runtime.spec import ModelSpec

_COMMON = ("channels", "input_size", "mean", "std")
_HEADS = {"num_classes": "classification", "embedding_dim": "embedding"}


@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Callable[..., nn.Module]
    task: str
    head: str
    defaults: dict[str, Any]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder(**options) -> nn.Module`` under ``name``; the builder is returned unchanged."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        params = inspect.signature(builder).parameters
        # Defaults are read from the signature so that the options a checkpoint stores and the ones
        # the builder applies can never drift apart.
        missing_default = [p for p, v in params.items() if v.default is inspect.Parameter.empty]
        if missing_default:
            raise TypeError(f"builder {name!r}: every option needs a default, missing for {missing_default}")
        absent = [p for p in _COMMON if p not in params]
        heads = [h for h in _HEADS if h in params]
        if absent or len(heads) != 1:
            raise TypeError(
                f"builder {name!r} must take {', '.join(_COMMON)} and exactly one of {', '.join(_HEADS)}"
            )
        if "class_names" in params:
            raise TypeError(f"builder {name!r}: class_names is handled by the registry, not the builder")
        head = heads[0]
        _REGISTRY[name] = _Entry(
            name=name,
            builder=builder,
            task=_HEADS[head],
            head=head,
            defaults={p: v.default for p, v in params.items()},
        )
        return builder

    return decorate


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def model_task(name: str) -> str:
    """'classification' or 'embedding'."""
    return _entry(name).task


def default_options(name: str) -> dict[str, Any]:
    """Every option ``build_model(name, ...)`` accepts, with its default (``class_names`` defaults to None)."""
    entry = _entry(name)
    return {**entry.defaults, "class_names": None}


def build_model(name: str, **options: Any) -> tuple[nn.Module, ModelSpec]:
    """Build model ``name`` with random weights, in train mode, and the spec that describes it.

    The model takes [0, 1] images of shape [B, channels, *input_size]; its first layer normalises them
    with ``mean``/``std``. A single-value ``mean``/``std`` is repeated over the channels; ``input_size``
    may be an int (square). With ``class_names`` and no explicit ``num_classes`` the class count
    follows the names. ``threat_model`` and ``method`` stay None: the trainer fills them in.

    Raises ValueError for an unknown name, an unknown option or an invalid value.
    """
    entry = _entry(name)
    allowed = sorted([*entry.defaults, "class_names"])
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {unknown}; allowed options: {allowed}")

    kwargs = {**entry.defaults, **options}
    class_names = kwargs.pop("class_names", None)
    channels = _positive_int(kwargs["channels"], "channels")
    kwargs["channels"] = channels
    kwargs["input_size"] = _pair(kwargs["input_size"])
    kwargs["mean"] = _per_channel(kwargs["mean"], channels, "mean")
    kwargs["std"] = _per_channel(kwargs["std"], channels, "std")
    if any(s <= 0 for s in kwargs["std"]):
        raise ValueError(f"std must be positive, got {kwargs['std']}")
    if class_names is not None:
        if isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise ValueError("class_names must be a list of strings")
        class_names = tuple(str(c) for c in class_names)
        if entry.head == "num_classes" and "num_classes" not in options:
            kwargs["num_classes"] = len(class_names)
    kwargs[entry.head] = _positive_int(kwargs[entry.head], entry.head)

    # The spec is validated before any weights are allocated, so a bad option fails fast.
    spec = ModelSpec(
        arch=name,
        task=entry.task,
        channels=channels,
        input_size=kwargs["input_size"],
        mean=kwargs["mean"],
        std=kwargs["std"],
        num_classes=kwargs.get("num_classes"),
        embedding_dim=kwargs.get("embedding_dim"),
        class_names=class_names,
    )
    model = entry.builder(**kwargs)
    return model, spec


def _positive_int(value: Any, what: str) -> int:
    # bool is an int subclass; True as a class count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"input_size must be an int or (height, width), got {value!r}")
    return (_positive_int(value[0], "input_size[0]"), _positive_int(value[1], "input_size[1]"))


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values for {channels} channel(s); give 1 or {channels}")
    return tuple(float(v) for v in values)
