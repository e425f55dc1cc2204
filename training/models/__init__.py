"""Model zoo: registered builders returning (module, ModelSpec).

Every model takes [0, 1] images [B, C, H, W] and normalises them in its first layer (``Normalize``).
Classifiers return logits [B, K] and export ``features(x) -> (fmap, pooled, logits)``; embedders
return L2-normalised embeddings [B, D] (and ``features(x) -> (fmap, pooled, embedding)``).
"""
from .layers import Normalize
from .registry import build_model, default_options, list_models, model_task, register_model

# Imported for their registration side effect only.
from . import c2f2, resnet, smallcnn, wideresnet  # noqa: E402,F401  isort: skip

__all__ = ["Normalize", "build_model", "default_options", "list_models", "model_task", "register_model"]
