"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node 2 -m recommender train --data big.parquet --out runs/x
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id job1 -m recommender train ...   # on every node

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `Dist.from_env`
reads them, and without them (a plain `recommender train`) training is single-process as
before. The backend is gloo on CPU and nccl on CUDA, each rank on `cuda:LOCAL_RANK`.

What each rank does (the Trainer implements it):
- every rank holds the whole model and the whole data (memory-mapped from the processed cache,
  which rank 0 writes first); DDP all-reduces gradients, so replicas stay identical;
- each epoch, every rank draws the same permutation and trains on its own disjoint slice of it,
  with negatives from a rank-offset generator (data/sampling.epoch_batches);
- rank 0 alone validates, then broadcasts the metrics, so every rank takes the same early
  stopping decision and they stay in lockstep; rank 0 alone writes logs, metrics and checkpoints,
  and saves the unwrapped module's state_dict, which loads in a single process.

Replicated embeddings stop scaling when a table no longer fits one device; TorchRec's sharded
embedding tables (row- or table-wise across ranks) are the next step there. See
docs/CODE_EXPLANATION.md, "Scale and distributed training".
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from recommender.utils import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job; `Dist()` is the single-process default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates and writes files."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Dist:
        """Read torchrun's variables; absent ones mean a single process."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except (KeyError, ValueError):
            raise ConfigError(
                "WORLD_SIZE is set but RANK / LOCAL_RANK are missing or not integers; "
                "start distributed runs with torchrun"
            ) from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, local)

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank: `cuda` becomes `cuda:LOCAL_RANK`."""
        if requested.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return requested

    def init(self, device: torch.device) -> None:
        """Join the process group (env:// rendezvous, as torchrun provides); no-op alone."""
        if not self.enabled or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            # DDP wrappers of finished stages can outlive their stage in reference cycles; a
            # reducer collected after the group is gone aborts the process at exit
            # ("terminate called without an active exception", seen in the 2-process test).
            # No barrier here: close also runs after an error on one rank, where a barrier
            # would wait forever for the others.
            gc.collect()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to train through: DDP around `model` when distributed, else `model`.

        Checkpoints always take `model` itself, so state_dict keys carry no `module.` prefix.
        Buffers are not re-broadcast at every step: each one (MF's latest items, LightGCN's
        graph edges) is built by every rank from the same data and never changes in training,
        and the graph's edges would cost a copy of the whole training set per step.
        """
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small picklable objects: metrics, decisions)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks of a few scalars (loss totals, sample counts)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def check_supported(dist_: Dist, device: torch.device, sparse: bool) -> None:
    """Fail before any work on a combination DDP cannot run."""
    if dist_.enabled and sparse and device.type == "cuda":
        raise ConfigError(
            "train.sparse=true cannot run under DDP on CUDA: NCCL has no sparse all-reduce; "
            "use dense embeddings (train.sparse=false) or a single GPU"
        )
