"""Loss terms of PGD-AT, TRADES and AGKD-BML.

AGKD-BML: Wang, H., et al., "AGKD-BML: Defense Against Adversarial Attack by Attention Guided Knowledge Distillation and
Bi-directional Metric Learning", ICCV 2021. MART: Wang, Y., et al., "Improving Adversarial Robustness Requires
Revisiting Misclassified Examples", ICLR 2020. TRADES: Zhang, H., et al., ICML 2019.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Keeps log() finite where a softmax probability underflows to 0 or reaches 1 (MART's own constants).
_LOG_EPS = 1e-12
_MARGIN_EPS = 1.0001


def attention_map(fmap: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Activation-based attention: the channel sum of a feature map, min-max normalised per sample.

    fmap: [B, C, h, w] (after the last ReLU, so non-negative) -> [B, h, w] in [0, 1]. ``eps`` keeps a constant
    map (all zeros) at 0 instead of NaN.
    """
    a = fmap.sum(dim=1)
    flat = a.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return (a - lo) / (hi - lo + eps)


def attention_distillation(student_maps: torch.Tensor, teacher_maps: torch.Tensor, eps: float = 1e-8
                           ) -> torch.Tensor:
    """Mean absolute difference between the student's and the (detached) teacher's attention maps.

    student_maps, teacher_maps: feature maps [B, C, h, w] -> scalar. The teacher side carries no gradient.
    """
    return F.l1_loss(attention_map(student_maps, eps), attention_map(teacher_maps.detach(), eps))


def angular_distance(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - |cos(u, v)| per row: [B, D] x 2 -> [B] in [0, 1]. Sign-blind, as in AGKD-BML's code."""
    return 1.0 - F.cosine_similarity(u, v, dim=1, eps=eps).abs()


def bml_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     margin: float = 0.03, l2_weight: float = 0.001) -> torch.Tensor:
    """AGKD-BML's bi-directional metric-learning triplet on the representation the classifier's output layer
    consumes (``features(x)[1]``), [B, D] -> scalar.

    ``mean(max(0, margin + d(a, p) - d(a, n))) + l2_weight * (mean(a^2) + mean(p^2) + mean(n^2))`` with the
    angular distance ``d``; the L2 term keeps the features from growing to shrink the angular terms' gradients.
    """
    d_ap = angular_distance(anchor, positive)
    d_an = angular_distance(anchor, negative)
    triplet = F.relu(margin + d_ap - d_an).mean()
    reg = anchor.pow(2).mean() + positive.pow(2).mean() + negative.pow(2).mean()
    return triplet + l2_weight * reg


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against AGKD-BML's smoothed labels: ``1 - s`` on the true class and ``s / (K - 1)`` on each
    other class (the authors' ``softmax_crossentropy_labelsmooth``; torch's ``label_smoothing=s`` would put
    ``1 - s + s / K`` on the true class instead). logits [B, K], y [B] -> scalar (batch mean)."""
    if smoothing == 0.0:
        return F.cross_entropy(logits, y)
    k = logits.shape[1]
    if k < 2:
        raise ValueError("label smoothing needs at least 2 classes")
    onehot = F.one_hot(y, k).to(logits.dtype)
    target = onehot * (1.0 - smoothing) + (1.0 - onehot) * (smoothing / (k - 1))
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mart_loss(logits_adv: torch.Tensor, logits_clean: torch.Tensor, y: torch.Tensor, beta: float = 6.0
              ) -> torch.Tensor:
    """MART's regulariser without its cross-entropy term (AGKD-BML brings its own, label-smoothed):

    ``mean(-log(1.0001 - p_adv[top wrong class])) + beta * mean(KL(p_clean || p_adv) * (1 - p_clean[y]))``,
    the top wrong class being the most likely class other than ``y`` under ``p_adv``.
    logits_adv, logits_clean: [B, K]; y: [B] -> scalar.
    """
    p_adv = logits_adv.softmax(dim=1)
    wrong = p_adv.detach().masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), float("-inf")).argmax(dim=1)
    margin = -torch.log(_MARGIN_EPS - p_adv.gather(1, wrong[:, None]).squeeze(1) + _LOG_EPS).mean()
    p_clean = logits_clean.softmax(dim=1)
    kl = F.kl_div(torch.log(p_adv + _LOG_EPS), p_clean, reduction="none").sum(dim=1)
    weight = 1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1)
    return margin + beta * (kl * weight).mean()


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(p_clean || p_adv) summed over classes: [B, K] x 2 -> [B] (``reduction='none'``) or its batch mean.

    Both sides carry gradient in training (TRADES); the attack detaches the clean side itself.
    """
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="none").sum(dim=1)
    return kl if reduction == "none" else kl.mean()
