"""Models: GMF, MLP (the seed's NCF), NeuMF, MF, LightGCN, GraphFilter, SASRec and Popularity,
built from a ModelConfig."""

from __future__ import annotations

import logging
import time

import torch

from recommender.config import ModelConfig
from recommender.data.interactions import Interactions
from recommender.models.base import RecModel
from recommender.models.gmf import GMF
from recommender.models.graphfilter import GraphFilter
from recommender.models.lightgcn import LightGCN
from recommender.models.mf import MF
from recommender.models.mlp import MLP
from recommender.models.neumf import NeuMF
from recommender.models.popularity import Popularity
from recommender.models.sasrec import SASRec

log = logging.getLogger("recommender")

__all__ = [
    "GMF",
    "MF",
    "MLP",
    "GraphFilter",
    "LightGCN",
    "NeuMF",
    "Popularity",
    "RecModel",
    "SASRec",
    "build_model",
    "fit_closed_form",
]


def build_model(
    cfg: ModelConfig, n_users: int, n_items: int, sparse: bool = False, cosine: bool = False
) -> RecModel:
    """The model named by cfg.name, sized for the vocabularies. `cosine`: score by the cosine
    of the user and item vectors, as a model trained with train.loss=ccl does (mf, lightgcn;
    config.py refuses ccl for the others)."""
    if cfg.name == "gmf":
        return GMF(n_users, n_items, cfg.embedding_dim, sparse)
    if cfg.name == "mf":
        return MF(n_users, n_items, cfg.embedding_dim, sparse, cfg.context, cosine)
    if cfg.name == "mlp":
        return MLP(n_users, n_items, cfg.mlp_layers, cfg.dropout, sparse)
    if cfg.name == "neumf":
        return NeuMF(n_users, n_items, cfg.embedding_dim, cfg.mlp_layers, cfg.dropout, sparse)
    if cfg.name == "lightgcn":
        return LightGCN(n_users, n_items, cfg.embedding_dim, cfg.layers, cosine)
    if cfg.name == "graphfilter":
        return GraphFilter(
            n_users,
            n_items,
            cfg.rank,
            cfg.ideal_weight,
            cfg.sharpen,
            cfg.degree_power,
            cfg.als_weight,
            cfg.embedding_dim,
            cfg.als_reg,
            cfg.als_alpha,
            cfg.als_sweeps,
        )
    if cfg.name == "sasrec":
        return SASRec(
            n_users, n_items, cfg.embedding_dim, cfg.max_len, cfg.blocks, cfg.heads, cfg.dropout
        )
    return Popularity(n_users, n_items)


def fit_closed_form(cfg: ModelConfig, data: Interactions, device: torch.device) -> RecModel:
    """Popularity or GraphFilter fitted on `data` (a run's train + validation): no epochs to
    choose, so the Trainer fits it in place of its stages."""
    if cfg.name == "popularity":
        return Popularity(data.n_users, data.n_items).fit(data.item_counts())
    model = build_model(cfg, data.n_users, data.n_items).to(device)
    if not isinstance(model, GraphFilter):
        raise ValueError(f"model.name={cfg.name} is trained, not fitted in closed form")
    model.set_graph(data.user_idx, data.item_idx)
    started = time.perf_counter()
    model.fit()
    log.info(
        "%s fitted on %d pairs in %.1f s (rank %d, ALS factors %d)",
        cfg.name,
        len(data.user_idx),
        time.perf_counter() - started,
        model.basis.shape[1],
        model.item_factors.shape[1],
    )
    return model
