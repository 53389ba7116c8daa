"""How the ANN library for two-stage retrieval was chosen: FAISS IVF-Flat vs HNSW (FAISS and
hnswlib) on a clustered 1,000,000 x 64 inner-product catalog, on this machine.

Reports build time, single-query latency and recall of the exact inner-product top-10 within
200 candidates. Needs faiss-cpu and hnswlib; the HNSW builds take minutes each on 2 cores,
which is itself the finding (a reload would wait that long).

    python benchmarks/serving_ann.py --items 1000000

`--smoke` runs every index on a 5,000-item catalog in seconds; without hnswlib it skips that one.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import torch

from smoke import add_arguments

CANDIDATES = 200


def clustered(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Items around 2,000 centroids, users mixing three: the shape of trained embeddings."""
    centroids = rng.standard_normal((2000, dim)).astype(np.float32)
    items = centroids[rng.integers(2000, size=n)] + 0.7 * rng.standard_normal((n, dim))
    users = centroids[rng.integers(2000, size=(200, 3))].sum(1)
    users += 0.5 * rng.standard_normal(users.shape)
    return (0.1 * items).astype(np.float32), users.astype(np.float32)


def measure(
    search: Callable[[np.ndarray], np.ndarray], users: np.ndarray, exact: np.ndarray
) -> str:
    found = search(users)
    recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found, strict=True)])
    start = time.perf_counter()
    for u in users:
        search(u[None])
    ms = (time.perf_counter() - start) / len(users) * 1e3
    return f"recall@10 in {CANDIDATES}: {recall:.3f}, {ms:.2f} ms/query"


def faiss_search(index: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A FAISS index's candidate ids for a batch of queries, as `measure` calls it."""
    return lambda queries: index.search(queries, CANDIDATES)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lists", default="1024,4096", help="IVF list counts")
    add_arguments(parser)  # nothing is written: --smoke-dir is not used
    args = parser.parse_args(argv)
    if args.smoke:
        args.items, args.dim, args.lists = 5_000, 16, "16,64"
    try:
        hnswlib = importlib.import_module("hnswlib")
    except ImportError:
        if not args.smoke:
            raise SystemExit("serving_ann.py needs hnswlib: pip install hnswlib") from None
        hnswlib = None
    items, users = clustered(args.items, args.dim, np.random.default_rng(0))
    exact = (torch.from_numpy(users) @ torch.from_numpy(items).T).topk(10).indices.numpy()
    start = time.perf_counter()
    for u in users[:20]:
        (torch.from_numpy(u[None]) @ torch.from_numpy(items).T).topk(10)
    print(f"brute force: {(time.perf_counter() - start) / 20 * 1e3:.1f} ms/query")

    for n_lists in (int(n) for n in args.lists.split(",")):
        start = time.perf_counter()
        ivf = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(args.dim), args.dim, n_lists, faiss.METRIC_INNER_PRODUCT
        )
        sample = np.random.default_rng(1).choice(
            args.items, min(args.items, 50 * n_lists), replace=False
        )
        ivf.train(items[sample])
        ivf.add(items)
        print(f"faiss IVF{n_lists}: built in {time.perf_counter() - start:.1f} s")
        for nprobe in (8, 16, 32, 64):
            ivf.nprobe = nprobe
            result = measure(faiss_search(ivf), users, exact)
            print(f"  nprobe {nprobe}: {result}")

    if hnswlib is None:
        print("hnswlib M16: skipped (not installed)")
    else:
        start = time.perf_counter()
        hnsw = hnswlib.Index(space="ip", dim=args.dim)
        hnsw.init_index(max_elements=args.items, M=16, ef_construction=100)
        hnsw.add_items(items)
        print(f"hnswlib M16: built in {time.perf_counter() - start:.1f} s")
        for ef in (200, 400):
            hnsw.set_ef(ef)
            found = measure(lambda q: hnsw.knn_query(q, CANDIDATES)[0], users, exact)
            print(f"  ef {ef}: {found}")

    start = time.perf_counter()
    fhnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    fhnsw.hnsw.efConstruction = 80
    fhnsw.add(items)
    print(f"faiss HNSW32: built in {time.perf_counter() - start:.1f} s")
    for ef in (200, 400):
        fhnsw.hnsw.efSearch = ef
        print(f"  ef {ef}: {measure(faiss_search(fhnsw), users, exact)}")


if __name__ == "__main__":
    main()
