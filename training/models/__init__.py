"""Model zoo: registered builders returning (module, ModelSpec).

Every model takes [0, 1] images [B, C, H, W] and normalises them in its first layer (``Normalize``).
Classifiers return logits [B, K] and export ``features(x) -> (fmap, rep, logits)``; embedders
return L2-normalised embeddings [B, D] (and ``features(x) -> (fmap, rep, embedding)``). fmap is a ReLU feature
map [B, C, h, w] (AGKD-BML's attention), rep [B, D'] is what the output layer consumes (its last ``nn.Linear``;
the global average of the last map for the ResNets, the penultimate fc for SmallCNN and C2F2).
"""
from .layers import Normalize
from .registry import build_model, default_options, list_models, model_task, register_model

# Imported for their registration side effect only.
from . import c2f2, resnet, smallcnn, wideresnet  # noqa: E402,F401  isort: skip

__all__ = ["Normalize", "build_model", "default_options", "list_models", "model_task", "register_model"]
