"""Deep-metric-learning pieces for robust embedders (Zhou and Patel, CVPR 2022): distances and hardness,
SPC-2 triplet samplers, destination pseudo-hardness (the Gradual Adversary), Hardness Manipulation and the
Intra-Class Structure term. Standard losses come from pytorch-metric-learning."""
from training.metric.hardness import (MARGIN, hardness, ics_loss, pairwise_distance, pdist, triplet_loss,
                                      triplet_loss_pml)
from training.metric.manipulation import HMResult, hardness_manipulation
from training.metric.pseudo import PSEUDO_HARDNESS, GradualAdversary, pseudo_hardness
from training.metric.samplers import SAMPLERS, sample_triplets, spc2_anchors

__all__ = [
    "GradualAdversary", "HMResult", "MARGIN", "PSEUDO_HARDNESS", "SAMPLERS", "hardness", "hardness_manipulation",
    "ics_loss", "pairwise_distance", "pdist", "pseudo_hardness", "sample_triplets", "spc2_anchors", "triplet_loss",
    "triplet_loss_pml",
]
