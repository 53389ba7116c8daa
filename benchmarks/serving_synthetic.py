"""A large synthetic NeuMF run directory: a 1,000,000-item catalog without a week of training.

Weights are constructed, not trained. Items sit around cluster centroids in the GMF space and
users mix a few clusters, which gives the retrieval vectors the kind of structure a trained
model has (a random Gaussian catalog would make any ANN index look bad and any re-ranking look
pointless). The MLP branch keeps random weights scaled so that it shifts scores by a fraction
of the GMF branch's spread: re-ranking then really changes the order, and the benchmark reports
how much of the exact top-10 the ANN stage keeps.

The checkpoint is written as training writes one (`BestCheckpoint`), so the real
`recommender serve` loads it like any trained run.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch

from recommender.checkpoint import (
    BEST_FILE,
    BestCheckpoint,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from recommender.config import Config
from recommender.models import NeuMF


@torch.no_grad()
def write_synthetic_run(
    out: Path,
    n_items: int = 1_000_000,
    n_users: int = 20_000,
    dim: int = 64,
    layers: tuple[int, ...] = (128, 64, 32, 16),
    n_clusters: int = 2_000,
    history: int = 20,
    mlp_share: float = 0.3,
    seed: int = 0,
    titles: bool = False,
) -> Path:
    """Write `out/best.pt` for a NeuMF over `n_items` items (with a title each if `titles`);
    returns the run directory."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    centroids = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    item_cluster = rng.integers(n_clusters, size=n_items)
    items = centroids[item_cluster] + 0.7 * rng.standard_normal((n_items, dim), dtype=np.float32)
    user_clusters = rng.integers(n_clusters, size=(n_users, 3))
    users = centroids[user_clusters].sum(1) + 0.5 * rng.standard_normal((n_users, dim))

    cfg = Config.model_validate(
        {"model": {"name": "neumf", "embedding_dim": dim, "mlp_layers": list(layers)}}
    )
    model = NeuMF(n_users, n_items, dim, list(layers), dropout=0.0)
    model.item_emb.weight.copy_(torch.from_numpy(items) * 0.1)
    model.user_emb.weight.copy_(torch.from_numpy(users.astype(np.float32)) * 0.1)
    model.tower.item_emb.weight.normal_(std=0.5)
    model.tower.user_emb.weight.normal_(std=0.5)
    # GMF weights 1; the MLP output weights scaled so its logits vary mlp_share as much.
    model.out.weight[0, :dim] = 1.0
    probe_u = torch.randint(n_users, (4096,))
    probe_i = torch.randint(n_items, (4096,))
    gmf = (model.user_emb(probe_u) * model.item_emb(probe_i)).sum(-1)
    mlp = model.tower(probe_u, probe_i) @ model.out.weight[0, dim:]
    model.out.weight[0, dim:] *= mlp_share * gmf.std() / mlp.std().clamp(min=1e-12)
    model.out.bias.fill_(-1.0)

    # Each user's history: items from their own clusters, like the structure above.
    by_cluster = np.argsort(item_cluster, kind="stable")
    starts = np.searchsorted(item_cluster[by_cluster], np.arange(n_clusters))
    sizes = np.bincount(item_cluster, minlength=n_clusters)
    picks = user_clusters[np.arange(n_users)[:, None], rng.integers(3, size=(n_users, history))]
    offsets = (rng.random((n_users, history)) * sizes[picks]).astype(np.int64)
    drawn = np.sort(by_cluster[starts[picks] + offsets], axis=1)
    hist = [np.unique(row) for row in drawn]
    indptr = np.concatenate([[0], np.cumsum([len(h) for h in hist])]).astype(np.int64)
    flat = np.concatenate(hist).astype(np.int32)

    out.mkdir(parents=True, exist_ok=True)
    ids = np.arange(n_items).astype(str)
    save_best(
        out,
        BestCheckpoint(
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config=cfg.to_dict(),
            config_digest=cfg.digest(),
            model_config=cfg.model.model_dump(mode="json"),
            n_users=n_users,
            n_items=n_items,
            state_dict=model.state_dict(),
            epoch=0,
            valid_metrics={},
            user_ids=np.char.add("u", np.arange(n_users).astype(str)),
            item_ids=ids,
            item_titles=np.char.add("Synthetic item ", ids) if titles else None,
            item_counts=torch.from_numpy(np.bincount(flat, minlength=n_items)),
            history_indptr=torch.from_numpy(indptr),
            history_items=torch.from_numpy(flat),
            source=f"synthetic {n_items:,}-item catalog (constructed weights)",
        ),
    )
    return out


def second_version(run_dir: Path, out: Path) -> Path:
    """A copy of `run_dir` whose best.pt says it was trained a second later: the same
    weights, another model version (digest + training time)."""
    shutil.copytree(run_dir, out)
    ckpt = load_checkpoint(run_dir / BEST_FILE)
    later = datetime.fromisoformat(ckpt["created_at"]) + timedelta(seconds=1)
    ckpt["created_at"] = later.isoformat(timespec="seconds")
    save_checkpoint(out / BEST_FILE, ckpt)
    return out
