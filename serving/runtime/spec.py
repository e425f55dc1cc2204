"""The model spec: what a model expects and what it was trained for. It travels with the weights."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.runtime.tasks import TaskName, get_task


class Frozen(BaseModel):
    """Base for every config and spec: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class ThreatModel(Frozen):
    """An L-p ball in pixel units ([0, 1] images)."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.1, ge=0.0)
    step: float = Field(0.01, gt=0.0)


class ModelSpec(Frozen):
    """Input contract and identity of a model. Inputs are [0, 1] images, N x C x H x W;
    normalisation (mean/std) is applied inside the model as its first layer."""

    arch: str
    task: TaskName  # a registered served task (serving.runtime.tasks): "classification", "embedding", ...
    channels: int = Field(ge=1)
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: Optional[int] = None
    embedding_dim: Optional[int] = None
    class_names: Optional[tuple[str, ...]] = None
    threat_model: Optional[ThreatModel] = None
    method: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {len(self.mean)}/{len(self.std)}")
        get_task(self.task).check_spec(self)
        if self.class_names is not None and self.num_classes and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        return self
