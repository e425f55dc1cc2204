"""The retrieval index: a FAISS index over a gallery of unit-norm embeddings, with each item's id and label.

Search is by inner product on L2-normalised vectors (cosine similarity). ``flat`` is exact; ``hnsw`` is an
approximate graph index for large galleries. Distances are reported as cosine distance, ``1 - similarity``.

Exact search of a batch of queries is one matrix product with the gallery (torch, on the worker's thread budget),
read straight from the FAISS index's storage, then top-k. A query streams the whole gallery from memory (60,000 x
512 float32 = 123 MB), so its cost is set by memory bandwidth: FAISS's own flat search streams it once per query
for batches under 20, one product reads it once per batch, which makes a handler batch of 16 several times cheaper
per query. On a large gallery, queries (one or a batch) are scanned over an int8 copy of the gallery first
(:class:`Int8Prefilter`: a quarter of the bytes, ONNX Runtime's integer product), and each query's best candidates
are rescored in float32; a bound on the int8 rounding certifies that no gallery vector outside the candidates can
enter the top k, and a query it cannot certify is searched in float32 as above, so the answer is the exact one
either way (scripts/bench_retrieval.py measures every path).
Files: ``gallery.index`` (FAISS) and ``gallery.json`` (ids, labels, class names, index kind).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from serving.runtime.errors import ArtifactError

INDEX_FILE = "gallery.index"
META_FILE = "gallery.json"
IndexKind = Literal["flat", "hnsw"]
log = logging.getLogger(__name__)
# Gallery rows per matrix product: bounds the score matrix at [N, 65,536] floats, whatever the gallery size.
BLOCK_ROWS = 1 << 16
# The int8 prefilter: candidates rescored in float32 (at least this many, and at least 4 k), and the
# smallest gallery it is used on: below it the float32 gallery (20,000 x 512 = 41 MB) is served partly from the
# caches, so there is less to save.
PREFILTER_CANDIDATES = 128
PREFILTER_MIN_ROWS = 20_000
# Slack on the certificate for float32 rounding of a 512-term dot product of unit vectors (~3e-5 at worst).
CERTIFICATE_SLACK = 1e-4


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


class InexactProduct(RuntimeError):
    """ONNX Runtime's integer matrix product is not exact on this CPU."""


class Int8Prefilter:
    """Exact search over unit vectors through an int8 copy of the gallery, for the queries it can certify.

    Each gallery vector ``g`` is stored as ``round(c g)`` in int8 with one scale ``c = 127 / max |g|`` for the
    gallery, and ``r = max_i ||g_i - code_i / c||`` is the largest rounding residual. A query ``q`` is rounded the
    same way with its own scale (``q~``). ONNX Runtime's integer matrix product (``MatMulInteger``, int32
    accumulation) gives the integer dot products exactly, so the approximate scores are ``a_i = q~ . g~_i`` and
    ``|q . g_i - a_i| <= e = ||q - q~|| max ||g_i|| + ||q~|| r``. Both sides go to it as uint8 with zero point 128:
    its uint8 x int8 kernel on x86 CPUs without VNNI adds pairs of products in saturating 16-bit arithmetic and
    gets large scores wrong, the uint8 x uint8 one widens to 16 bits first. The product is checked against numpy
    at build time (:meth:`_check_exact`); where it is not exact the prefilter is not used.

    The ``m`` best approximate scores become candidates, rescored in float32; let ``s_k`` be the k-th best exact
    score among them. A vector outside them scores at most ``a_(m) + e``: when that is below ``s_k``, the
    candidates' top k is the gallery's top k (certified). Otherwise :meth:`search` marks the query uncertified and
    the caller searches the float32 gallery for it. A batch of queries is one int8 product, which reads the codes
    once for all of them; each query is certified on its own.

    ``e`` is about 0.02 at 512 dimensions: random unit vectors certify (their top scores are spread wider);
    embeddings whose near neighbours crowd together certify less often. :meth:`worth_trying` keeps the prefilter
    off while most queries fail (a failed query costs its int8 scan on top of the float32 search) and tries it
    again every ``RETRY_EVERY`` queries.

    Memory: half the float32 gallery's again (the int8 codes, plus the packed copy ONNX Runtime makes of them at
    load: without it the product runs about 3x slower).
    """

    RATE_WEIGHT = 1 / 32  # weight of the newest query in the running certification rate
    BREAK_EVEN = 0.5  # below this rate the int8 scan costs more than it saves
    RETRY_EVERY = 16

    def __init__(self, vectors: np.ndarray, threads: int = 1):
        n, d = vectors.shape
        if d * 127 * 127 >= 1 << 24:
            raise ValueError(f"{d}-d vectors: integer scores would not be exact in float32")
        self.scale = _int8_scale(vectors)
        codes = np.empty((d, n), np.uint8)  # transposed: the right-hand side of the product, zero point 128
        residual = 0.0
        for start in range(0, n, BLOCK_ROWS):
            block = vectors[start:start + BLOCK_ROWS]
            ints = _int8_round(block, self.scale)
            codes[:, start:start + len(block)] = (ints.T + 128).astype(np.uint8)
            residual = max(residual, float(np.linalg.norm(block - ints / self.scale, axis=1).max()))
        self.residual = residual
        self.max_norm = float(np.linalg.norm(vectors, axis=1).max()) if n else 0.0
        self.nbytes = codes.nbytes  # what a query scans
        self.session = _int8_top_session(codes, threads)
        self._check_exact(codes)
        self.certified = 0  # queries answered from the candidates
        self.failed = 0  # queries the bound could not certify
        self.skipped = 0  # queries sent straight to the float32 scan
        self.rate = 1.0  # running certification rate
        self._since_try = 0

    def top(self, q_ints: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer queries [N, D] (values in [-127, 127]) -> (each one's m largest integer dot products with the
        codes, descending, float32 [N, m]; their positions, int64 [N, m])."""
        a = (q_ints + 128).astype(np.uint8)  # MatMulInteger's left side is uint8 with zero point 128
        scores, pos = self.session.run(None, {"q": a, "m": np.array([m], np.int64)})
        return scores, pos

    def _check_exact(self, codes: np.ndarray, columns: int = 4096) -> None:
        """Raise :class:`InexactProduct` unless the session's integer scores equal numpy's int64 products for
        queries of extreme values (all +127, all -127, random +-127: what overflows a 16-bit intermediate), over the
        top ``columns`` scores each returns."""
        d, n = codes.shape
        rng = np.random.default_rng(0)
        probes = np.stack([np.full(d, 127), np.full(d, -127), 127 * rng.choice([-1, 1], d)]).astype(np.float32)
        m = min(columns, n)
        for rows in (probes[:1], probes):  # one query, and a batch (the kernels differ)
            scores, pos = self.top(rows, m)
            for q, s, p in zip(rows.astype(np.int64), scores, pos):
                expected = q @ (codes[:, p].astype(np.int64) - 128)
                if not np.array_equal(s.astype(np.int64), expected):
                    bad = int(np.flatnonzero(s.astype(np.int64) != expected)[0])
                    raise InexactProduct(f"ONNX Runtime's integer product gave {int(s[bad])} where numpy gives "
                                         f"{int(expected[bad])} on this CPU")

    def worth_trying(self, queries: int = 1) -> bool:
        """Whether the next ``queries`` (one search) should try the prefilter (counts the ones that do not)."""
        if self.rate >= self.BREAK_EVEN or self._since_try >= self.RETRY_EVERY:
            self._since_try = 0
            return True
        self._since_try += queries
        self.skipped += queries
        return False

    def search(self, vectors: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries ``q`` [N, D] over the float32 gallery ``vectors`` [G, D] (the rows the codes were made from),
        one int8 product for all N -> (the k largest inner products [N, k] descending, their positions [N, k],
        certified [N] bool). Rows not certified hold nothing usable: search them in float32."""
        n = len(q)
        sims, pos = np.zeros((n, k), np.float32), np.zeros((n, k), np.int64)
        ok = np.zeros(n, bool)
        m = max(PREFILTER_CANDIDATES, 4 * k)
        if m >= len(vectors):
            return sims, pos, ok
        q_scale = np.array([_int8_scale(row) for row in q])[:, None]
        q_ints = _int8_round(q, q_scale)
        approx, cand = self.top(q_ints, m)
        q_round = q_ints / q_scale
        error = (np.linalg.norm(q - q_round, axis=1) * self.max_norm
                 + np.linalg.norm(q_round, axis=1) * self.residual + CERTIFICATE_SLACK)
        outside = approx[:, -1] / (q_scale[:, 0] * self.scale) + error  # the best any non-candidate can score
        for i in range(n):
            exact = vectors[cand[i]] @ q[i]
            order = np.argsort(-exact, kind="stable")[:k]
            ok[i] = outside[i] < exact[order[-1]]
            if ok[i]:
                sims[i], pos[i] = exact[order], cand[i][order]
            self.rate += self.RATE_WEIGHT * (float(ok[i]) - self.rate)
        self.certified += int(ok.sum())
        self.failed += int(n - ok.sum())
        return sims, pos, ok


def _int8_top_session(codes: np.ndarray, threads: int):
    """An ONNX Runtime session: uint8 queries [N, D] and m -> each query's m largest integer dot products with
    ``codes`` [D, G] (uint8), both with zero point 128, as float32 (exact: below 2^24), and their positions."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    d, n = codes.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["q", "codes", "zero", "zero"], ["dots"]),
         helper.make_node("Cast", ["dots"], ["scores"], to=TensorProto.FLOAT),
         helper.make_node("TopK", ["scores", "m"], ["top", "pos"], axis=1)],
        "int8_top",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [None, d]),
         helper.make_tensor_value_info("m", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("top", TensorProto.FLOAT, [None, None]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [None, None])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(np.array(128, np.uint8), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what every supported ONNX Runtime reads
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _int8_scale(x: np.ndarray) -> float:
    """The scale that maps the largest magnitude of ``x`` to 127."""
    top = float(np.abs(x).max()) if x.size else 0.0
    return 127.0 / top if top > 0 else 1.0


def _int8_round(x: np.ndarray, scale) -> np.ndarray:
    """``x`` scaled (a number, or one per row as [N, 1]) and rounded to integers in [-127, 127], as float32."""
    return np.clip(np.rint(x * scale), -127, 127).astype(np.float32)


class RetrievalIndex:
    def __init__(self, index, ids: Sequence[str], labels: np.ndarray, class_names: Optional[Sequence[str]] = None,
                 kind: IndexKind = "flat", ef_search: int = 64, model_sha256: Optional[str] = None,
                 threads: int = 1, prefilter: bool = True):
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
        # flat, large galleries: the int8 prefilter (see Int8Prefilter), made at the first search or at load
        self.use_prefilter = prefilter and kind == "flat" and len(ids) >= PREFILTER_MIN_ROWS
        self._prefilter: Optional[Int8Prefilter] = None
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
              ef_construction: int = 80, ef_search: int = 64, model_sha256: Optional[str] = None,
              prefilter: bool = True) -> "RetrievalIndex":
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
        return cls(index, [str(i) for i in ids], np.asarray(labels), class_names, kind, ef_search, model_sha256,
                   prefilter=prefilter)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [N, D] -> (cosine distances [N, k] ascending, gallery positions [N, k]); k is capped at the
        gallery size."""
        q = _unit(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        k = min(int(k), len(self))
        if self.kind != "flat":
            sims, pos = self.index.search(q, k)
        elif (pf := self.prefilter()) is not None and pf.worth_trying(len(q)):
            sims, pos, ok = pf.search(self.gallery().numpy(), q, k)
            if not ok.all():
                rest = np.flatnonzero(~ok)
                sims[rest], pos[rest] = self._float32(q[rest], k)
        else:
            sims, pos = self._float32(q, k)
        # Rounding can push 1 - similarity of a vector with itself just below 0.
        return np.maximum(1.0 - sims, 0.0).astype(np.float32), pos

    def _float32(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the float32 gallery: one matrix product for a batch, FAISS's scan for one query."""
        return self._exact(q, k) if len(q) > 1 else self.index.search(q, k)

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit queries [N, D] -> (the k largest inner products [N, k] descending, gallery positions [N, k] int64),
        over every gallery vector, on ``self.threads`` threads."""
        torch = _torch()
        # torch's thread count is the process's: set for the product and put back (costs microseconds), so a
        # process that searches (a CLI probing an archive) keeps its own setting for everything else.
        before = torch.get_num_threads()
        if before != self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._blocks(torch, self.gallery(), q, k)
        finally:
            if before != self.threads:
                torch.set_num_threads(before)

    def gallery(self):
        """flat: a torch view [G, D] of the index's own float32 storage (not a copy: the index keeps its vectors
        contiguous, row-major, and is never added to)."""
        if self._gallery is None:
            n, d = len(self), self.dim
            self._gallery = _torch().from_numpy(_faiss().rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d))
        return self._gallery

    def prefilter(self) -> Optional[Int8Prefilter]:
        """flat: the int8 copy of the gallery (built at the first call: about 1 s per 60,000 vectors here); None
        where the prefilter is off, or turned itself off (see :class:`InexactProduct`)."""
        if self._prefilter is None and self.use_prefilter:
            try:
                self._prefilter = Int8Prefilter(self.gallery().numpy(), self.threads)
            except InexactProduct as e:
                log.warning("int8 prefilter off, every query scans the float32 gallery: %s", e)
                self.use_prefilter = False
        return self._prefilter

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
