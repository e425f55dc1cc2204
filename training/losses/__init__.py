"""Loss terms of the robust training methods, each a plain function tested against a loop oracle."""
from training.losses.classification import (angular_distance, attention_distillation, attention_map,
                                            bml_triplet_loss, mart_loss, smoothed_cross_entropy, trades_kl)

__all__ = ["angular_distance", "attention_distillation", "attention_map", "bml_triplet_loss", "mart_loss",
           "smoothed_cross_entropy", "trades_kl"]
