"""The probe set: held-out labelled images shipped with a model, with the outputs the exported artifact gave them.

Served models run it at start-up (does this engine, on this machine, reproduce the export?), and it is the seed set
for on-demand health probes (clean and attacked accuracy of the live model). File: ``probes.npz`` with
``x`` uint8 [N, C, H, W], ``y`` int64 [N], ``expected`` float32 [N, K or D], and ``ids`` [N] (each image's
dataset id, ``<dataset>/<split>/<position>``, the form gallery ids take: a retrieval probe never lets an image
retrieve itself). Its SHA-256 (:meth:`ProbeSet.sha256`) names it in probe reports.
"""
from __future__ import annotations

import io
import os
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

PROBES_FILE = "probes.npz"


@dataclass(frozen=True)
class ProbeSet:
    x: np.ndarray  # uint8 [N, C, H, W]
    y: np.ndarray  # int64 [N]
    expected: np.ndarray  # float32 [N, K] logits or [N, D] embeddings
    ids: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise ValueError(f"probe images must be uint8 [N, C, H, W], got {self.x.dtype} {self.x.shape}")
        if not (len(self.x) == len(self.y) == len(self.expected)):
            raise ValueError(f"probe set sizes differ: {len(self.x)} images, {len(self.y)} labels, "
                             f"{len(self.expected)} expected outputs")
        if self.ids is not None and len(self.ids) != len(self.y):
            raise ValueError(f"probe set has {len(self.ids)} ids for {len(self.y)} images")

    def __len__(self) -> int:
        return len(self.y)

    def images(self) -> np.ndarray:
        """float32 [N, C, H, W] in [0, 1]: exactly what the artifact saw at export."""
        return self.x.astype(np.float32) / np.float32(255.0)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        buf = io.BytesIO()
        extra = {} if self.ids is None else {"ids": np.asarray(self.ids, dtype=np.str_)}
        np.savez_compressed(buf, x=self.x, y=self.y.astype(np.int64), expected=self.expected.astype(np.float32),
                            **extra)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "ProbeSet":
        with np.load(path, allow_pickle=False) as f:
            ids = tuple(str(i) for i in f["ids"]) if "ids" in f.files else None
            return cls(x=f["x"], y=f["y"], expected=f["expected"], ids=ids)

    def sha256(self) -> str:
        """Hash of the images and labels (what a probe measures on), independent of the file's compression."""
        h = hashlib.sha256()
        h.update(np.asarray(self.x.shape, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y.astype(np.int64)).tobytes())
        return h.hexdigest()

    def max_deviation(self, run, batch_size: int = 64) -> float:
        """Largest |run(x) - expected| over the set; ``run`` maps float32 [B, C, H, W] -> [B, K or D]."""
        worst = 0.0
        xs = self.images()
        for s in range(0, len(xs), batch_size):
            out = np.asarray(run(xs[s:s + batch_size]), dtype=np.float32)
            worst = max(worst, float(np.abs(out - self.expected[s:s + batch_size]).max()))
        return worst


def clean_score(outputs: np.ndarray, y: np.ndarray, task: str) -> float:
    """Clean score in [0, 1] of model outputs [N, ...] on labels y [N], as the task measures it (accuracy of
    logits; leave-one-out Recall@1 of embeddings within the set: the nearest other image shares the label)."""
    from serving.runtime.tasks import get_task

    return get_task(task).clean_score(outputs, y)


def self_check_margin(p: float, n: int) -> float:
    """How far below a known score the probe-set score may fall by chance: three binomial standard errors on n
    points plus two points for engine and decoding noise."""
    return 3.0 * float(np.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1))) + 0.02
