"""Gallery search: per-query latency of the serving index (:class:`~serving.runtime.index.RetrievalIndex`), exact
(``flat``) against HNSW, as the gallery grows, and HNSW's recall@10 against exact search.

Exact search is measured side by side on the same index and queries: the index's own path (on galleries of 20,000
and more, single queries and batches through the certified int8 prefilter,
:class:`~serving.runtime.index.Int8Prefilter`, falling back to float32), the index's float32 path alone for batches
(one matrix product, torch, one thread), and FAISS's float32 flat scan (``IndexFlatIP.search``, one pass over the
gallery per query when fewer than 20 queries come together). All must return the same neighbours.
Beside them, the memory-bandwidth roofline of one query: the bytes scanned over the read bandwidth of one core,
measured in the same run (a dot product of a 256 MB vector with itself).

Galleries: the embedder's own embeddings of the 10,000 Fashion-MNIST test images, and synthetic galleries of random
unit vectors of the same dimension (60,000 and 1,000,000 by default). Queries: held-out test images for the real
gallery, fresh random unit vectors for the synthetic ones. Search runs one query at a time on one thread, as a
serving worker runs it (plus one batch of 16 queries, per query); building uses the machine's threads. HNSW's
``efSearch`` is swept upwards and the smallest value that reaches the recall target is reported with the others.

Results JSON: ``benchmarks/results/retrieval_search.json`` (suite ``retrieval-search``); :func:`markdown` renders
its BENCHMARKS.md section.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Settings:
    synthetic: tuple[int, ...] = (60_000, 1_000_000)
    hnsw_max: int = 1_000_000  # larger galleries: flat only
    queries: int = 200  # per gallery, one at a time
    k: int = 10
    recall_target: float = 0.99
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    embedder_export: Optional[str] = None  # None: an untrained C2F2 (512-d)
    seed: int = 0
    out: str = "benchmarks/results/retrieval_search.json"
    command: str = "scripts/bench_retrieval.py"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n random unit vectors [n, d], made in chunks so 1M x 512 needs no float64 copy."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        out[s:s + 100_000] = unit(rng.standard_normal((min(100_000, n - s), d), dtype=np.float32))
    return out


def real_gallery(export: Path) -> tuple[np.ndarray, np.ndarray]:
    """(gallery embeddings of the 10,000 test images, query embeddings of 1,000 training images), unit norm."""
    from serving.runtime.artifacts import load_manifest
    from serving.runtime.session import open_session
    from training.data import load_dataset

    m = load_manifest(export)
    sess = open_session(export, m, threads=os.cpu_count() or 1)

    def embed(x: np.ndarray) -> np.ndarray:
        return unit(np.concatenate([sess.run(x[s:s + 256]) for s in range(0, len(x), 256)]))

    test = load_dataset("fashion-mnist", "test").images.numpy().astype(np.float32) / 255
    train = load_dataset("fashion-mnist", "train").images[:1000].numpy().astype(np.float32) / 255
    return embed(test), embed(train)


class FaissScan:
    """FAISS's own float32 scan over the index's vectors: the baseline of both exact paths of the index."""

    def __init__(self, index):
        self.index = index.index

    def search(self, queries: np.ndarray, k: int):
        """(cosine distances [N, k] ascending, positions [N, k]), as the index answers."""
        sims, pos = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return 1.0 - sims, pos


def read_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """GB/s one core reads a large float32 vector at (a dot product with itself: every byte read once), best of
    ``reps`` by CPU time."""
    import torch

    torch.set_num_threads(1)
    v = torch.ones(mb << 18)  # mb MiB of float32
    torch.dot(v, v)
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        torch.dot(v, v)
        best = min(best, time.process_time() - t)
    return v.numel() * 4 / best / 1e9


def per_query(index, queries: np.ndarray, k: int, single: bool = True) -> dict[str, float]:
    """One query at a time: wall-clock p50/p99/mean and CPU ms per query (this process's CPU time, which waiting
    for a core on a shared machine does not inflate). Then the same queries in batches of 16, as a serving worker
    searches one handler batch at once: CPU and wall ms per query. ``single=False``: the batches only."""
    r = lambda v: round(1000 * v, 3)  # noqa: E731
    out: dict[str, float] = {}
    if single:
        for q in queries[:5]:
            index.search(q[None], k)
        lat = []
        cpu0 = time.process_time()
        for q in queries:
            t = time.perf_counter()
            index.search(q[None], k)
            lat.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu0) / len(queries)
        lat.sort()
        out.update(p50_ms=r(lat[len(lat) // 2]), p99_ms=r(lat[int(0.99 * len(lat))]), mean_ms=r(float(np.mean(lat))),
                   cpu_ms=r(cpu))
    index.search(queries[:16], k)
    cpu0, t = time.process_time(), time.perf_counter()
    for s in range(0, len(queries), 16):
        index.search(queries[s:s + 16], k)
    out.update(batch16_cpu_ms=r((time.process_time() - cpu0) / len(queries)),
               batch16_wall_ms=r((time.perf_counter() - t) / len(queries)))
    return out


def same_neighbours(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two searches found the same neighbours at the same distances: equal sets of positions per query
    (the order of float32 near-ties may differ) and distances within 1e-6."""
    return bool(all(set(x) == set(y) for x, y in zip(a[1], b[1])) and np.allclose(a[0], b[0], atol=1e-6))


def single_queries(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The queries searched one at a time (the single-query path), stacked."""
    found = [index.search(q[None], k) for q in queries]
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def certifiable(index, queries: np.ndarray, k: int) -> float:
    """The share of ``queries`` whose int8 prefilter answer certifies on this gallery, every query tried (also on
    galleries too small for the index to use it)."""
    from serving.runtime.index import Int8Prefilter, _unit

    vectors = index.gallery().numpy()
    pf = index._prefilter or Int8Prefilter(vectors)
    return round(float(np.mean(pf.search(vectors, _unit(queries), k)[2])), 3)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found, [N, k] positions each."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def bench_gallery(name: str, gallery: np.ndarray, queries: np.ndarray, s: Settings) -> dict[str, Any]:
    import faiss

    from serving.runtime.index import RetrievalIndex

    n = len(gallery)
    ids, labels = [str(i) for i in range(n)], np.zeros(n, np.int64)
    row: dict[str, Any] = {"gallery": name, "size": n, "dim": int(gallery.shape[1]), "queries": len(queries)}
    t = time.perf_counter()
    flat = RetrievalIndex.build(gallery, ids, labels, kind="flat")
    row["flat_build_s"] = round(time.perf_counter() - t, 2)
    if flat.use_prefilter:
        t = time.perf_counter()
        flat.prefilter()
        row["prefilter_build_s"] = round(time.perf_counter() - t, 2)
    faiss.omp_set_num_threads(1)
    row["flat"] = per_query(flat, queries, s.k)
    pf = flat._prefilter  # its counts over the timed queries (warm-up, single queries and batches of 16)
    row["prefilter"] = ({"certified": pf.certified, "failed": pf.failed, "skipped": pf.skipped,
                         "bytes_per_query": int(pf.nbytes)} if pf is not None else None)
    row["flat_faiss_scan"] = per_query(FaissScan(flat), queries, s.k)
    # the index's float32 path alone (the same FAISS storage, no int8 copy): batches as one matrix product
    row["flat_float32"] = per_query(RetrievalIndex(flat.index, ids, labels, kind="flat", prefilter=False), queries,
                                    s.k, single=False)
    exact = flat.search(queries, s.k)
    scanned = FaissScan(flat).search(queries, s.k)
    row["flat_paths_agree"] = same_neighbours(exact, scanned)
    row["flat_single_agree"] = same_neighbours(single_queries(flat, queries, s.k), scanned)
    row["bytes_per_query"] = int(gallery.nbytes)
    row["certifiable"] = certifiable(flat, queries, s.k)
    exact = exact[1]
    log.info("%s flat: %s; faiss scan: %s", name, row["flat"], row["flat_faiss_scan"])
    del flat
    if n > s.hnsw_max:
        row["hnsw"] = None
        return row
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    hnsw = RetrievalIndex.build(gallery, ids, labels, kind="hnsw", hnsw_m=s.hnsw_m,
                                ef_construction=s.ef_construction)
    row["hnsw_build_s"] = round(time.perf_counter() - t, 2)
    faiss.omp_set_num_threads(1)
    sweep = []
    for ef in s.ef_search:
        hnsw.index.hnsw.efSearch = ef
        _, found = hnsw.search(queries, s.k)
        point = {"ef_search": ef, "recall_at_10": round(recall(found, exact), 4), **per_query(hnsw, queries, s.k)}
        log.info("%s hnsw ef=%d: %s", name, ef, point)
        sweep.append(point)
        if point["recall_at_10"] >= s.recall_target:
            break
    row["hnsw"] = sweep
    return row


def run(s: Settings) -> dict[str, Any]:
    import tempfile

    import faiss

    rng = np.random.default_rng(s.seed)
    bandwidth = read_bandwidth()
    log.info("read bandwidth of one core: %.1f GB/s", bandwidth)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as work:
        if s.embedder_export:
            export = Path(s.embedder_export)
        else:
            from serving.bench.load import untrained_export

            export = untrained_export(Path(work), "c2f2")
        gallery, queries = real_gallery(export)
    rows = [bench_gallery("Fashion-MNIST test embeddings", gallery, queries[:s.queries], s)]
    d = gallery.shape[1]
    for n in s.synthetic:
        rows.append(bench_gallery("random unit vectors", random_unit(n, d, rng), random_unit(s.queries, d, rng), s))
    return {"suite": "retrieval-search", "command": s.command, "rows": rows,
            "config": {"k": s.k, "queries": s.queries, "recall_target": s.recall_target, "hnsw_m": s.hnsw_m,
                       "ef_construction": s.ef_construction, "hnsw_max": s.hnsw_max,
                       "embedder": s.embedder_export or "untrained C2F2", "search_threads": 1,
                       "read_gb_per_s": round(bandwidth, 2)},
            "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "faiss": faiss.__version__,
                        "load_average_before": list(os.getloadavg())}}


def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [
        f"Exact (`flat`) and HNSW (M = {cfg['hnsw_m']}, efConstruction = {cfg['ef_construction']}) search through "
        f"the serving index, k = {cfg['k']}, {cfg['queries']} queries one at a time on {cfg['search_threads']} "
        f"thread (as a worker runs them), faiss {m['faiss']}, {m['cores']} shared cores (load average "
        f"{m['load_average_before'][0]:.1f} before the run). Recall@10 is against exact search on the same "
        f"queries; efSearch is raised until it reaches {cfg['recall_target']}. Embedder: {cfg['embedder']}.",
        "",
        "Per query, in ms: wall-clock p50 and p99 of single queries, CPU time of a single query, and CPU time per "
        "query when the queries come in batches of 16 (one handler batch, searched at once). CPU time is what a "
        "query costs; the wall clock also holds the waits for a core on this shared machine.",
        "",
        "| gallery | size | dim | flat p50 | flat p99 | flat CPU | flat CPU in batches of 16 | HNSW efSearch | "
        "HNSW recall@10 | HNSW p50 | HNSW p99 | HNSW CPU | HNSW build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for r in result["rows"]:
        f = r["flat"]
        h = (r.get("hnsw") or [None])[-1]
        hcols = (f"{h['ef_search']} | {h['recall_at_10']:.3f} | {h['p50_ms']} | {h['p99_ms']} | {h['cpu_ms']} | "
                 f"{r['hnsw_build_s']}" if h else "not built (see below) | - | - | - | - | -")
        lines.append(f"| {r['gallery']} | {r['size']:,} | {r['dim']} | {f['p50_ms']} | {f['p99_ms']} | "
                     f"{f['cpu_ms']} | {f['batch16_cpu_ms']} | {hcols} |")
        base = base or r
    bw = cfg.get("read_gb_per_s")
    if bw and all("prefilter" in r for r in result["rows"]):
        lines += _roofline_tables(result["rows"], bw)
    for key, what in (("flat", "the index"), ("flat_faiss_scan", "FAISS's float32 scan")):
        if all(key in r for r in result["rows"]):
            lines += ["", f"Growth of exact search with the gallery, {what} (CPU per single query, relative to the "
                          f"first row): " +
                      ", ".join(f"{r['size']:,}: x{r[key]['cpu_ms'] / base[key]['cpu_ms']:.1f}"
                                for r in result["rows"]) + "."]
    sweeps = [r for r in result["rows"] if r.get("hnsw")]
    if sweeps:
        lines += ["", "HNSW efSearch sweeps (stopped at the first value reaching the target, else at the largest "
                      "tried):", ""]
        for r in sweeps:
            lines.append(f"- {r['gallery']}, {r['size']:,}: " + "; ".join(
                f"ef {p['ef_search']}: recall {p['recall_at_10']:.3f}, CPU {p['cpu_ms']} ms" for p in r["hnsw"]))
    big = [r for r in result["rows"] if r.get("hnsw") is None]
    if big:
        lines += ["", "HNSW was not built for " + ", ".join(f"{r['size']:,}" for r in big) +
                  f" vectors (above `hnsw_max` = {cfg['hnsw_max']:,}): its build time grows about linearly with "
                  "the gallery (see the build column), too long for this shared machine."]
    return "\n".join(lines) + "\n"


def _roofline_tables(rows: list[dict], bw: float) -> list[str]:
    """The exact-search tables: single queries (int8 prefilter against the float32 scan) and batches of 16, each
    beside its memory-bandwidth roofline."""
    ms = lambda nbytes: nbytes / bw / 1e6  # noqa: E731 (ms to read nbytes at the measured bandwidth)
    lines = ["", f"Exact search against the memory-bandwidth roofline, CPU ms per query. A query must read every "
                 f"gallery vector, so its roofline is the bytes scanned over the read bandwidth of one core, "
                 f"measured in the same run at {bw:.1f} GB/s (a dot product of a 256 MB vector with itself).", "",
             "Single queries: the index scans an int8 copy of the gallery (a quarter of the bytes) and rescores the "
             "best 128 in float32 when a bound on the int8 rounding certifies that nothing else can enter the top "
             "10; otherwise it scans the float32 gallery, and it stops trying the int8 scan while most queries "
             "fail (one try in 16). Galleries under 20,000 vectors go straight to the float32 scan. Counts: "
             "queries certified / failed / sent straight to the float32 scan, over the timed queries. Certifiable: "
             "the share of the queries that certify when every one tries the int8 path (any gallery size).", "",
             "| gallery | size | float32 MB | float32 roofline | FAISS float32 scan | int8 MB | int8 roofline | "
             "index | certified / failed / skipped | certifiable | speed-up | same results |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, fs, pf = r["flat"], r["flat_faiss_scan"], r["prefilter"]
        int8 = (f"{pf['bytes_per_query'] / 1e6:,.1f} | {ms(pf['bytes_per_query']):.2f}" if pf else "- | -")
        counts = f"{pf['certified']} / {pf['failed']} / {pf['skipped']}" if pf else "not used (small gallery)"
        speed_up = f"x{fs['cpu_ms'] / f['cpu_ms']:.1f}" if pf else "- (the same FAISS call)"
        lines.append(f"| {r['gallery']} | {r['size']:,} | {r['bytes_per_query'] / 1e6:,.1f} | "
                     f"{ms(r['bytes_per_query']):.2f} | {fs['cpu_ms']} | {int8} | {f['cpu_ms']} | {counts} | "
                     f"{r['certifiable']:.0%} | "
                     f"{speed_up} | "
                     f"{'yes' if r['flat_single_agree'] else 'NO'} |")
    lines += ["", "Batches of 16 (one handler batch), CPU ms per query: the index (galleries of 20,000 and more: one "
                  "int8 product reads the codes once for all 16, each query certified on its own, the rest searched "
                  "in float32; smaller ones: the float32 path), the index's float32 path alone (one matrix product "
                  "reads the float32 gallery once for all 16), and FAISS's flat scan (reads it once per query below "
                  "20 queries). Same queries, one thread.",
              "", "| gallery | size | float32 roofline per query in 16 | index | float32 matrix product | FAISS scan | "
                  "index vs FAISS | index vs matrix product | same results |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, fs, f32 = r["flat"], r["flat_faiss_scan"], r.get("flat_float32")
        product = f"{f32['batch16_cpu_ms']}" if f32 else "-"
        vs_product = f"x{f32['batch16_cpu_ms'] / f['batch16_cpu_ms']:.1f}" if f32 else "-"
        lines.append(f"| {r['gallery']} | {r['size']:,} | {ms(r['bytes_per_query']) / 16:.2f} | "
                     f"{f['batch16_cpu_ms']} | {product} | {fs['batch16_cpu_ms']} | "
                     f"x{fs['batch16_cpu_ms'] / f['batch16_cpu_ms']:.1f} | {vs_product} | "
                     f"{'yes' if r['flat_paths_agree'] else 'NO'} |")
    return lines
