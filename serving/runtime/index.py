"""The retrieval index: a FAISS index over a gallery of unit-norm embeddings, with each item's id and label.

Search is by inner product on L2-normalised vectors (cosine similarity). ``flat`` is exact; ``hnsw`` is an
approximate graph index for large galleries. Distances are reported as cosine distance, ``1 - similarity``.

Exact search of a batch of queries is one matrix product with the gallery (torch, on the worker's thread budget),
read straight from the FAISS index's storage, then top-k. A query streams the whole gallery from memory (60,000 x
512 float32 = 123 MB), so its cost is set by memory bandwidth: FAISS's own flat search streams it once per query
for batches under 20, one product reads it once per batch, which makes a handler batch of 16 several times cheaper
per query. A single query still goes through FAISS's scan, a little faster than a matrix-vector product here
(scripts/bench_retrieval.py measures both paths).
Files: ``gallery.index`` (FAISS) and ``gallery.json`` (ids, labels, class names, index kind).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from serving.runtime.errors import ArtifactError

INDEX_FILE = "gallery.index"
META_FILE = "gallery.json"
IndexKind = Literal["flat", "hnsw"]
# Gallery rows per matrix product: bounds the score matrix at [N, 65,536] floats, whatever the gallery size.
BLOCK_ROWS = 1 << 16


def _faiss():
    import faiss

    return faiss


def _torch():
    import torch

    return torch


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class RetrievalIndex:
    def __init__(self, index, ids: Sequence[str], labels: np.ndarray, class_names: Optional[Sequence[str]] = None,
                 kind: IndexKind = "flat", ef_search: int = 64, model_sha256: Optional[str] = None,
                 threads: int = 1):
        if index.ntotal != len(ids) or len(ids) != len(labels):
            raise ArtifactError(f"gallery index holds {index.ntotal} vectors, {len(ids)} ids, {len(labels)} labels")
        self.index = index
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.kind = kind
        self.ef_search = ef_search
        self.model_sha256 = model_sha256  # the artifact that computed the gallery embeddings
        self.threads = threads  # intra-op threads of exact search: a worker's budget (workers scale out)
        self._gallery = None  # flat: a torch view [G, D] of the index's own storage, made at the first search
        if kind == "hnsw":
            index.hnsw.efSearch = ef_search

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Sequence[str], labels: Sequence[int],
              class_names: Optional[Sequence[str]] = None, kind: IndexKind = "flat", hnsw_m: int = 32,
              ef_construction: int = 80, ef_search: int = 64, model_sha256: Optional[str] = None
              ) -> "RetrievalIndex":
        """embeddings: [G, D]; normalised here, so cosine similarity is the inner product."""
        faiss = _faiss()
        x = _unit(embeddings)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"gallery embeddings must be a non-empty [G, D] array, got shape {x.shape}")
        d = x.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        else:
            raise ValueError(f"unknown index kind {kind!r}; choose flat or hnsw")
        index.add(x)
        return cls(index, [str(i) for i in ids], np.asarray(labels), class_names, kind, ef_search, model_sha256)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [N, D] -> (cosine distances [N, k] ascending, gallery positions [N, k]); k is capped at the
        gallery size."""
        q = _unit(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        k = min(int(k), len(self))
        sims, pos = self._exact(q, k) if self.kind == "flat" and len(q) > 1 else self.index.search(q, k)
        # Rounding can push 1 - similarity of a vector with itself just below 0.
        return np.maximum(1.0 - sims, 0.0).astype(np.float32), pos

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit queries [N, D] -> (the k largest inner products [N, k] descending, gallery positions [N, k] int64),
        over every gallery vector, on ``self.threads`` threads."""
        torch = _torch()
        if self._gallery is None:
            n, d = len(self), self.dim
            # A view, not a copy: the index keeps its vectors contiguous, float32, row-major, and is never added to.
            self._gallery = torch.from_numpy(_faiss().rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d))
        # torch's thread count is the process's: set for the product and put back (costs microseconds), so a
        # process that searches (a CLI probing an archive) keeps its own setting for everything else.
        before = torch.get_num_threads()
        if before != self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._blocks(torch, self._gallery, q, k)
        finally:
            if before != self.threads:
                torch.set_num_threads(before)

    @staticmethod
    def _blocks(torch, g, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Block by block of the gallery ``g`` [G, D]: each block's top k merged into the running top k."""
        best_s = best_p = None
        with torch.inference_mode():
            qt = torch.from_numpy(q)
            for start in range(0, len(g), BLOCK_ROWS):
                scores = qt @ g[start:start + BLOCK_ROWS].T
                s, p = torch.topk(scores, min(k, scores.shape[1]), dim=1)
                p += start
                if best_s is not None:
                    s, i = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
                    p = torch.gather(torch.cat([best_p, p], 1), 1, i)
                best_s, best_p = s, p
        return best_s.numpy(), best_p.numpy()

    def vectors(self) -> np.ndarray:
        """The gallery's unit embeddings, float32 [G, D], in gallery order."""
        return np.ascontiguousarray(self.index.reconstruct_n(0, len(self)), dtype=np.float32)

    def save(self, root: str | Path) -> list[str]:
        """Writes the index and its metadata into ``root``; returns the file names."""
        faiss = _faiss()
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(root / INDEX_FILE))
        meta = {"kind": self.kind, "dim": self.dim, "size": len(self), "ef_search": self.ef_search,
                "metric": "inner_product_on_unit_vectors", "ids": self.ids, "labels": self.labels.tolist(),
                "class_names": list(self.class_names) if self.class_names else None,
                "model_sha256": self.model_sha256}
        tmp = root / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, root / META_FILE)
        return [INDEX_FILE, META_FILE]

    @classmethod
    def load(cls, root: str | Path, threads: int = 1) -> "RetrievalIndex":
        root = Path(root)
        if not (root / INDEX_FILE).is_file() or not (root / META_FILE).is_file():
            raise ArtifactError(f"{root} holds no gallery index ({INDEX_FILE}, {META_FILE})")
        faiss = _faiss()
        meta = json.loads((root / META_FILE).read_text())
        index = faiss.read_index(str(root / INDEX_FILE))
        return cls(index, meta["ids"], np.asarray(meta["labels"]), meta.get("class_names"), meta["kind"],
                   int(meta.get("ef_search", 64)), meta.get("model_sha256"), threads)
