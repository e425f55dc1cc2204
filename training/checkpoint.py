"""Checkpoint format shared by training, evaluation and export.

A checkpoint is a ``torch.save`` dict:
  model:      state_dict of the module
  spec:       ModelSpec as a dict (serving.runtime.spec.ModelSpec)
  arch_options: keyword options the model builder was called with
  config:     the resolved TrainConfig as a dict
  epoch:      epochs completed
  optimizer, scheduler, method_state, rng: present in ``last.pt`` for resuming
  metrics:    latest evaluation figures (dict)

The weights-only form (the model zoo's): ``<name>.pt`` holds the state_dict alone, read with
``torch.load(weights_only=True)``, and ``<name>.json`` beside it holds everything else above as plain data
(spec, arch_options, config, epoch, metrics). :func:`load_checkpoint` reads both forms.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from serving.runtime.spec import ModelSpec


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a checkpoint (missing, a folder, not a ``torch.save`` archive), or None."""
    import zipfile

    path = Path(path)
    if not path.exists():
        return f"{path} not found (train one with `robustserve train`)"
    if not path.is_file():
        return f"{path} is a folder; name the checkpoint file in it (model.pt or last.pt)"
    if not zipfile.is_zipfile(path):
        return f"{path} is not a checkpoint (torch.save writes a zip archive; this is not one)"
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise (FileNotFoundError if not path.exists() else ValueError)(f"checkpoint {problem}")
    meta = weights_only_meta(path)
    if meta.is_file():
        return {**json.loads(meta.read_text()),
                "model": torch.load(path, map_location=map_location, weights_only=True)}
    # Weights only: a checkpoint is tensors and plain data (the spec, options and config are dicts), so nothing
    # in it needs unpickling code, and a checkpoint from elsewhere cannot run any.
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain data, so it is not loaded (weights-only "
                         f"loading refuses to run code from a checkpoint): {str(e).splitlines()[0]}") from None


def weights_only_meta(path: str | Path) -> Path:
    """The plain-data half of a weights-only checkpoint ``path``: ``<stem>.json`` beside it."""
    return Path(path).with_suffix(".json")


def save_weights_only(ckpt: dict, path: str | Path) -> None:
    """Writes ``ckpt`` (the dict form) as ``path`` (the state_dict, CPU tensors) and ``<stem>.json`` (the rest:
    spec, arch_options, config, epoch, metrics). Training state (optimizer, rng) is left out."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in ckpt["model"].items()}
    meta = {k: ckpt[k] for k in ("spec", "arch_options", "config", "epoch", "metrics") if k in ckpt}
    save_atomic(state, path)
    weights_only_meta(path).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the module from a checkpoint. Returns (model on ``map_location``, in eval mode; ModelSpec;
    checkpoint dict)."""
    from training.models import build_model

    ckpt = load_checkpoint(path, map_location)
    spec = ModelSpec.model_validate(ckpt["spec"])
    model, _ = build_model(spec.arch, **ckpt.get("arch_options", {}))
    model.load_state_dict(ckpt["model"])
    model.to(map_location)
    model.eval()
    return model, spec, ckpt
