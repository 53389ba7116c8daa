"""Two-stage retrieval for large catalogs: ANN candidates, then exact re-ranking.

Users (`TwoStageRetriever`): stage one searches an inverted-file index (FAISS `IndexIVFFlat`,
inner product) over the model's retrieval vectors: the GMF / MF embeddings whose dot product
approximates the score, for NeuMF its GMF branch. Stage two scores the candidates with the full
model, so the final order is the model's own; only items the ANN stage misses can be lost.

Items (`ItemNeighbours`, similar items and anonymous sessions): the same two stages in the
model's item space, candidates from an 8-bit quantised IVF index over the normalised item
representations, re-ranked by their exact cosine. The quantised index holds a quarter of the
float vectors' memory: the Recommender already keeps those floats for the exact scores, and a
1,000,000 x 128 catalog would otherwise hold a second 512 MB copy.

IVF rather than HNSW: on a 1,000,000 x 64 catalog on 2 cores the IVF index builds in seconds
(HNSW took about four minutes, which would stall every start and reload) and reaches a higher
recall of the exact inner-product top-10 at the same latency (docs/BENCHMARKS.md, Serving).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from recommender.evaluate import exact_top_k
from recommender.models import RecModel
from recommender.utils import RecommenderError

log = logging.getLogger("recommender")

# Training points per IVF list: FAISS asks for at least 39; more only slows start-up.
TRAIN_PER_LIST = 64
MAX_LISTS = 4096


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise RecommenderError(
            "two-stage retrieval needs FAISS: pip install faiss-cpu "
            "(or raise RECOMMENDER_SERVE_ANN_THRESHOLD above the catalog size)"
        ) from None
    return faiss


def ivf_index(vectors: np.ndarray, nprobe: int, nlist: int | None, quantised: bool = False) -> Any:
    """An inner-product IVF index over (n, d) float32 `vectors`, row i as id i: flat, or with
    8-bit scalar-quantised codes. Built here, searched by one thread per query."""
    faiss = import_faiss()
    # One OpenMP thread: an IVF search parallelises over queries, so a request's single
    # query gains nothing, while FAISS's spinning workers fight torch's for the cores
    # (p50 of a 1M-item request: 24 ms with two threads, 1.4 ms with one, on 2 cores).
    faiss.omp_set_num_threads(1)
    n, dim = vectors.shape
    n_lists = min(nlist or round(math.sqrt(n)), MAX_LISTS, n)
    quantizer = faiss.IndexFlatIP(dim)
    if quantised:
        eight_bit = faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, n_lists, eight_bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, n_lists, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    n_train = min(n, TRAIN_PER_LIST * n_lists)
    index.train(vectors[rng.choice(n, n_train, replace=False)])
    index.add(vectors)
    index.nprobe = nprobe
    kind = "IVF-SQ8" if quantised else "IVF-Flat"
    log.info("%s index: %d vectors, %d lists, nprobe %d", kind, n, n_lists, nprobe)
    return index


def search(index: Any, queries: np.ndarray, n: int) -> np.ndarray:
    """(Q, d) float32 queries -> (Q, n) ids of the index's n best, -1 where none was found;
    searched by the calling thread alone. FAISS's OpenMP thread count is the calling thread's
    own setting, so every serving thread sets it: left at one per core, a batch of nine users
    on the 1M-item catalog took p50 7.8 / p99 17.7 ms in process against 5.7 / 8.1 ms."""
    import_faiss().omp_set_num_threads(1)
    _, found = index.search(queries, n)
    return np.asarray(found)


def _check_shape(index: Any, n: int, d: int, what: str) -> None:
    """Refuse an index built over other vectors than the (n, d) ones it is to serve."""
    if (index.ntotal, index.d) != (n, d):
        raise RecommenderError(
            f"the {what} index holds {index.ntotal} x {index.d} vectors, the model {n} x {d}"
        )


def _candidates(found: np.ndarray, n: int, exclude: Sequence[np.ndarray] | None) -> np.ndarray:
    """(Q, m) ANN hits (-1: none) -> (Q, n) the first n per row not in `exclude[row]`, -1
    padding."""
    cand = np.full((len(found), n), -1, dtype=np.int64)
    for row, hits in enumerate(found):
        hits = hits[hits >= 0]
        if exclude is not None and len(exclude[row]):
            hits = hits[~np.isin(hits, exclude[row])]
        cand[row, : min(n, len(hits))] = hits[:n]
    return cand


def _best(cand: np.ndarray, scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, n) candidates and their exact scores (-inf: no candidate) -> (Q, k) item indices
    and scores, best first; -1 and NaN where no candidate is left."""
    top_scores, top_pos = (t.cpu().numpy() for t in exact_top_k(scores, k))
    empty = top_pos < 0
    top_idx = np.take_along_axis(cand, np.maximum(top_pos, 0), axis=1)
    top_idx[empty] = -1
    return top_idx, np.where(empty, np.nan, top_scores)


class TwoStageRetriever:
    """Top-k per user from `candidates` ANN hits re-scored exactly by `model`.

    Example:
        >>> retriever = TwoStageRetriever(model, candidates=200, nprobe=16)  # doctest: +SKIP
        >>> idx, scores = retriever.topk(np.array([0, 5]), k=10)             # (2, 10), (2, 10)
    """

    def __init__(
        self,
        model: RecModel,
        candidates: int,
        nprobe: int,
        nlist: int | None = None,
        device: torch.device | str = "cpu",
        index: Any | None = None,
    ) -> None:
        """`index`: an index of the model's item retrieval vectors built beforehand
        (serving/indexes.py); without one it is built here."""
        vectors = model.retrieval_vectors()
        if vectors is None:
            raise RecommenderError(f"{type(model).__name__} has no retrieval vectors for ANN")
        users, items = (v.detach().cpu().float().contiguous().numpy() for v in vectors)
        self.model = model
        self.device = torch.device(device)
        self.candidates = candidates
        self.user_vectors = users  # (n_users, d)
        self.index = ivf_index(items, nprobe, nlist) if index is None else index
        _check_shape(self.index, len(items), items.shape[1], "ANN")

    def search(self, user_idx: np.ndarray, n: int) -> np.ndarray:
        """(U,) known user indices -> (U, n) candidate item indices, -1 where none was found."""
        return search(self.index, self.user_vectors[user_idx], n)

    @torch.no_grad()
    def topk(
        self,
        user_idx: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(U,) known user indices -> (U, k) item indices and probabilities, best first.

        `exclude[u]` holds items to drop for user u (the history). The search asks for that
        many extra hits so excluded items do not eat into the candidate budget. Slots with no
        candidate left hold index -1 and score NaN.
        """
        n = max(self.candidates, k)
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        cand = _candidates(self.search(user_idx, n + extra), n, exclude)
        valid = cand >= 0
        rows, cols = np.nonzero(valid)
        users = torch.from_numpy(user_idx[rows]).to(self.device)
        items = torch.from_numpy(cand[rows, cols]).to(self.device)
        scores = torch.full(cand.shape, -torch.inf, device=self.device)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.sigmoid(
            self.model(users, items).float()
        )
        return _best(cand, scores, k)


class ItemNeighbours:
    """Items nearest to query vectors in the item space: `candidates` hits of a quantised IVF
    index re-scored by their exact inner product with the query (`Recommender.similar_items`
    and `similar_to_items` pass their normalised item vectors, so that is the cosine).

    Example:
        >>> near = ItemNeighbours(item_space, candidates=200, nprobe=64)   # doctest: +SKIP
        >>> idx, scores = near.topk(item_space[[3]], k=10, exclude=[np.array([3])])  # (1, 10)
    """

    def __init__(
        self,
        item_space: torch.Tensor,
        candidates: int,
        nprobe: int,
        nlist: int | None = None,
        index: Any | None = None,
    ) -> None:
        """`index`: the quantised index of `item_space` built beforehand (serving/indexes.py);
        without one it is built here."""
        self.space = item_space  # (n_items, r), shared with the Recommender
        self.candidates = candidates
        if index is None:
            vectors = item_space.detach().cpu().float().contiguous().numpy()
            index = ivf_index(vectors, nprobe, nlist, quantised=True)
        _check_shape(index, item_space.shape[0], item_space.shape[1], "item")
        self.index = index

    @torch.no_grad()
    def topk(
        self, queries: torch.Tensor, k: int, exclude: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, r) query vectors -> (Q, k) item indices and exact scores, best first; the
        items in `exclude[q]` are left out of row q. -1 and NaN where no candidate is left."""
        n = max(self.candidates, k)
        extra = max((len(e) for e in exclude), default=0)
        query = queries.detach().cpu().float().contiguous().numpy()
        found = search(self.index, query, n + extra)
        cand = _candidates(found, n, exclude)
        valid = torch.from_numpy(cand >= 0)
        vectors = self.space[torch.from_numpy(np.maximum(cand, 0))]  # (Q, n, r)
        exact = (vectors @ queries.to(vectors)[:, :, None])[..., 0]  # (Q, n)
        return _best(cand, exact.float().masked_fill(~valid, -torch.inf), k)
