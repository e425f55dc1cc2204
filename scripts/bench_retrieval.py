"""Gallery search latency, exact vs HNSW, 10k real embeddings and synthetic 60k / 1M galleries; see
:mod:`serving.bench.search`. Writes benchmarks/results/retrieval_search.json; `robustserve bench render --set
stems=retrieval_search` regenerates its BENCHMARKS.md section.

    .venv/bin/python scripts/bench_retrieval.py [--embedder-export runs/demo/embedder/export] [--synthetic 60000 1000000]
        [--ef-search 16 32 ... 65536] [--out benchmarks/results/retrieval_search_1m.json]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from serving.bench import search, write

    d = search.Settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder-export", help="embedder export folder (default: an untrained C2F2)")
    ap.add_argument("--synthetic", type=int, nargs="*", default=list(d.synthetic))
    ap.add_argument("--hnsw-max", type=int, default=d.hnsw_max)
    ap.add_argument("--queries", type=int, default=d.queries)
    ap.add_argument("--ef-search", type=int, nargs="+", default=list(d.ef_search),
                    help="HNSW efSearch values, swept upwards until the recall target is reached")
    ap.add_argument("--out", default=str(ROOT / d.out))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = search.Settings(synthetic=tuple(args.synthetic), hnsw_max=args.hnsw_max, queries=args.queries,
                        ef_search=tuple(sorted(args.ef_search)),
                        embedder_export=args.embedder_export, out=args.out,
                        command=("scripts/bench_retrieval.py " + " ".join(sys.argv[1:])).strip())
    result = search.run(s)
    out = write(result, args.out)
    print(search.markdown(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
