"""Config roots for ``robustserve train`` and ``robustserve evaluate``."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from serving.runtime.evaluation.classification import AttackSpec  # noqa: F401  (part of this config's schema)
from serving.runtime.spec import Frozen, ThreatModel


class DataConfig(Frozen):
    name: str = "fashion-mnist"
    root: Optional[str] = None  # None: the registry's default location (Fashion-MNIST: the Debian package)
    augment: bool = True
    train_subset: Optional[int] = Field(None, ge=1)  # first N of a fixed seeded permutation; None: all
    options: dict[str, Any] = Field(default_factory=dict)  # loader options, e.g. image-folder's size


class ModelConfig(Frozen):
    arch: str = "smallcnn"
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the builder


class OptimConfig(Frozen):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "cosine", "multistep"] = "cosine"
    milestones: tuple[int, ...] = ()  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: float = Field(0.0, ge=0)


class MethodConfig(Frozen):
    name: str = "standard"
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the method's own Options model
    attack: ThreatModel = ThreatModel()  # the training threat model
    attack_steps: int = Field(10, ge=1)


class SpeedConfig(Frozen):
    """How the training step runs; what it computes is the same up to rounding. Evaluation and probe attacks
    always run in fp32 (they are what we report)."""

    # bf16 autocast for the model's forward/backward and the training-time attacks. auto: bf16 where the device
    # has native bf16 arithmetic (CPU with AVX-512 BF16 or AMX, CUDA with compute capability >= 8.0), else fp32
    # (emulated bf16 is slower than fp32).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # NHWC weights and inputs for 4-D image models (oneDNN's and cuDNN's preferred layout).
    channels_last: bool = True


class TrainConfig(Frozen):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)  # small budgets for tests
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/train"
    resume: bool = True  # continue from out_dir/last.pt when it exists
    # Start from another run's weights (its model.pt, same architecture) instead of a fresh initialisation: a
    # fine-tuning run. Its epochs count on top of the epochs that trained the starting point.
    init_from: Optional[str] = None
    eval_every: int = Field(1, ge=0)  # epochs between clean test evaluations; 0: never
    num_threads: Optional[int] = Field(None, ge=1)  # None: the cores this process may run on
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="after")
    def _check_method_options(self) -> "TrainConfig":
        # Method options are free-form here; the method's own Options model rejects unknown keys, so a typo is
        # caught by --dry-run and before any data is loaded.
        from training.methods import method_class

        cls = method_class(self.method.name)
        try:
            cls.Options.model_validate(self.method.options)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"method.options for {self.method.name!r}: {bad}") from None
        return self


DEFAULT_SUITE = (
    AttackSpec(name="fgsm", steps=1),
    AttackSpec(name="pgd", steps=20),
    AttackSpec(name="cw", steps=20),
    AttackSpec(name="apgd-ce", steps=50),
    AttackSpec(name="apgd-t", steps=50),
)


class EvaluateConfig(Frozen):
    checkpoint: str = "runs/train/model.pt"
    data: DataConfig = DataConfig(augment=False)
    attacks: tuple[AttackSpec, ...] = DEFAULT_SUITE
    eps: tuple[float, ...] = (0.1,)
    curve_eps: tuple[float, ...] = ()  # extra eps values for the robustness curve; empty: eps only
    subset: Optional[int] = Field(None, ge=1)  # first N of a fixed seeded permutation of the test set
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    device: str = "auto"
    out_dir: Optional[str] = None  # None: beside the checkpoint
    sanity_checks: bool = True
    profile: Optional[Literal["rob28", "rob224"]] = None  # embedders' ranking-attack profile; None: by input size
    num_threads: Optional[int] = None
