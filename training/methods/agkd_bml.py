"""AGKD-BML (Wang et al., ICCV 2021): attention-guided knowledge distillation from a frozen clean teacher plus
bi-directional metric learning, on top of label-smoothed CE + MART. The algorithm is SPEC.md section 1.

Checked against the authors' code (hongw579/AGKD-BML: main.py, utils.py, custom_models/model.py). The same:
label smoothing (1 - s on the true class, s / (K - 1) on each other), MART's terms and constants, the attention map
(channel sum, min-max normalised per sample, L1 between student and teacher), the sign-blind angular distance and
the triplet with its L2 term on the representation the output layer consumes (WRN: the pooled map, SmallCNN: the
fc2 activations), the forward AE toward the most confusing class, the backward AE from a random training image of
that class toward y, both with the training PGD's eps/step/steps and a random start, one student pass in train
mode over [x_f, x, x_b], the teacher on [x, x'], the student initialised from the teacher, loss weights 1/1/1/2.
Deviations, with the reason:
- Images are in [0, 1] pixel units with normalisation inside the model (theirs normalise to [-1, 1] first and
  attack in that space): the same threat model, stated in the units every other method here uses.
- The attacks run with every submodule in eval mode and restore each one's own flag (theirs call ``.train()``
  on the whole net afterwards): the same for the models here, which have no mixed modes.
- The backward source image is drawn with the run's seeded generator, and augmented as the loader augments
  (theirs: the dataset's transform on a numpy-random draw): reproducible runs.
- Architecture, optimiser and schedule are the run's (the paper: WRN-28-10, SGD lr 0.1, steps at 100/150 of 200
  epochs, weight decay 2e-4); the comparison benches give every method the same ones.
- Two optional warm-ups, off by default (the published constants): ``label_smoothing_ramp_epochs`` and
  ``mart_ramp_epochs`` raise the smoothing and MART's weight linearly from 0. The classifier bench uses both over
  the first student epoch: at its few-epoch budgets the published constants from the first step collapse the
  student to a constant prediction (see ``mart_ramp_epochs`` and training/bench/robust_classifiers.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from pydantic import Field
from torch import nn

from serving.runtime.spec import Frozen
from serving.runtime.attacks import LpBall, eval_mode, targeted_pgd
from training.data import augment_batch, sample_class_images
from training.losses import attention_distillation, bml_triplet_loss, mart_loss, smoothed_cross_entropy
from training.methods.base import TrainingMethod, register_method

log = logging.getLogger(__name__)


class AGKDBMLOptions(Frozen):
    teacher: str  # a `standard` checkpoint (model.pt) of the same architecture
    init_from_teacher: bool = True
    label_smoothing: float = Field(0.5, ge=0.0, lt=1.0)
    # Epochs over which the smoothing rises linearly from 0 to label_smoothing (0: the published constant). A
    # student distilled for a few epochs only spends them fitting 0.5-smoothed targets; the ramp lets it fit the
    # labels first, as the published schedule's 200 epochs allow.
    label_smoothing_ramp_epochs: float = Field(0.0, ge=0.0)
    # Epochs over which MART's weight rises linearly from 0 to w_mart (0: the published constant). From a clean
    # teacher's weights the adversarial examples are confidently wrong, and MART's terms (-log(1 - p_wrong) and
    # beta * KL(p_clean || p_adv) * (1 - p_clean[y])) are lowest for a constant prediction: in a short run the
    # student collapses to it (10 % clean) within ~20 steps. The ramp lets CE and the distillation make the
    # student robust first, as a long published schedule does after its first epochs.
    mart_ramp_epochs: float = Field(0.0, ge=0.0)
    mart_beta: float = Field(6.0, ge=0.0)
    margin: float = Field(0.03, ge=0.0)  # triplet margin on the angular distance
    feature_l2: float = Field(0.001, ge=0.0)  # weight of the triplet representations' squared norm in L_bml
    # L = w_ce * L_ce + w_mart * L_mart + w_at * L_at + w_bml * L_bml; the published weights are 1, 1, 1, 2.
    w_ce: float = Field(1.0, ge=0.0)
    w_mart: float = Field(1.0, ge=0.0)
    w_at: float = Field(1.0, ge=0.0)
    w_bml: float = Field(2.0, ge=0.0)
    augment_backward: Optional[bool] = None  # augment the backward AE's source image; None: as data.augment


def most_confusing_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmax over k != y of ``logits`` [B, K]: the class each sample is closest to confusing y with -> [B]."""
    return logits.detach().scatter(1, y[:, None], float("-inf")).argmax(dim=1)


def backward_sources(train_set, classes: torch.Tensor, generator: Optional[torch.Generator], augment: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each class in ``classes`` [B], a uniformly drawn training image of that class, augmented as the loader
    does. Returns (x' [B, C, H, W] in [0, 1] on ``classes``' device, y' [B], dataset indices [B])."""
    idx = sample_class_images(train_set, classes.cpu(), generator)
    xs, ys = train_set.get(idx)
    if augment:
        xs = augment_batch(xs, train_set.crop_padding, train_set.hflip, generator)
    return xs.to(classes.device), ys.to(classes.device), idx


def forward_backward_aes(model: nn.Module, x: torch.Tensor, c: torch.Tensor, xs: torch.Tensor, y: torch.Tensor,
                         ball: LpBall, steps: int, generator: Optional[torch.Generator]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward AE (x toward c) and the backward AE (x' toward y) from one batched targeted PGD run.

    Equal to two separate runs drawing from the same generator in that order (targeted_pgd is batch-consistent).
    x, xs: [B, C, H, W]; c, y: [B] -> (x_f, x_b), each [B, C, H, W].
    """
    adv = targeted_pgd(model, torch.cat([x, xs]), torch.cat([c, y]), ball, steps, generator=generator)
    return adv[: len(x)], adv[len(x):]


@register_method("agkd-bml")
class AGKDBML(TrainingMethod):
    Options = AGKDBMLOptions

    def setup(self, model: nn.Module) -> None:
        from training.checkpoint import load_model

        path = Path(self.options.teacher)
        teacher, tspec, _ = load_model(path, map_location=self.device)
        if tspec.arch != self.spec.arch:
            raise ValueError(f"teacher {path} is a {tspec.arch}, the student a {self.spec.arch}: AGKD-BML needs the "
                             "same architecture")
        if tspec.method not in (None, "standard"):
            log.warning("teacher %s was trained with %r; AGKD-BML expects a clean (standard) teacher",
                        path, tspec.method)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if self.options.init_from_teacher:
            model.load_state_dict(teacher.state_dict())
        cfg = self.context.get("train_config")
        augment = self.options.augment_backward
        self.augment_backward = bool(cfg.data.augment if augment is None and cfg is not None else augment)
        self.ball = LpBall.from_threat(self.cfg.attack)
        self.steps_done = 0
        per_epoch = len(self.train_set) // max(1, cfg.batch_size) if cfg is not None else 1
        if cfg is not None and cfg.max_steps_per_epoch:
            per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
        self.steps_per_epoch = max(1, per_epoch)

    def _ramped(self, value: float, epochs: float) -> float:
        """``value`` reached linearly from 0 over ``epochs`` (0: constant), at the current step."""
        if epochs <= 0:
            return value
        return value * min(1.0, self.steps_done / (epochs * self.steps_per_epoch))

    def smoothing(self) -> float:
        """The label smoothing of the current step (the ramp's value while it lasts)."""
        return self._ramped(self.options.label_smoothing, self.options.label_smoothing_ramp_epochs)

    def mart_weight(self) -> float:
        """MART's weight at the current step (the ramp's value while it lasts)."""
        return self._ramped(self.options.w_mart, self.options.mart_ramp_epochs)

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state.get("steps_done", 0))

    def training_step(self, net, model, x, y):
        o = self.options
        with torch.no_grad(), eval_mode(model):
            c = most_confusing_class(model(x), y)
        xs, _, _ = backward_sources(self.train_set, c, self.generator, self.augment_backward)
        x_f, x_b = forward_backward_aes(model, x, c, xs, y, self.ball, self.cfg.attack_steps, self.generator)

        b = len(x)
        # One student pass over the mixed batch (BatchNorm statistics over [x_f, x, x_b], as published).
        fmap, rep, logits = net(torch.cat([x_f, x, x_b]), "features")
        with torch.no_grad():
            t_fmap = self.teacher.features(torch.cat([x, xs]))[0]
        logits_f, logits_x = logits[:b], logits[b:2 * b]
        z_f, z_x, z_b = rep[:b], rep[b:2 * b], rep[2 * b:]

        smoothing, w_mart = self.smoothing(), self.mart_weight()
        self.steps_done += 1
        l_ce = smoothed_cross_entropy(logits_f, y, smoothing)
        l_mart = mart_loss(logits_f, logits_x, y, o.mart_beta)
        l_at = attention_distillation(fmap[:b], t_fmap[:b]) + attention_distillation(fmap[2 * b:], t_fmap[b:])
        l_bml = bml_triplet_loss(z_f, z_x, z_b, o.margin, o.feature_l2)
        loss = o.w_ce * l_ce + w_mart * l_mart + o.w_at * l_at + o.w_bml * l_bml
        with torch.no_grad():
            adv_acc = (logits_f.argmax(1) == y).float().mean().item()
        return loss, {"loss": loss.item(), "ce": l_ce.item(), "mart": l_mart.item(), "at": l_at.item(),
                      "bml": l_bml.item(), "adv_acc": adv_acc, "smoothing": smoothing, "w_mart": w_mart}
