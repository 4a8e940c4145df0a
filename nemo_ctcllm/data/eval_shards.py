"""Validation and test sharded over the ranks, and their epoch sums reduced over the ranks.

NeMo's classic (non-lhotse) evaluation loader has no sampler of its own, and with
``trainer.use_distributed_sampler: false`` (the recipe's: lhotse shards the training batches itself) every rank
would evaluate the whole dev set, LLM objectives included. :func:`shard_eval_loader` gives it an
:class:`EvalShardSampler` instead, which shards as the training data is sharded: by global rank, each rank its own
utterances (rank ``r`` of ``W`` reads manifest lines ``r, r + W, r + 2W, ...``, each line on exactly one rank).
The TP peers of a rank therefore read other utterances, as in training, and the LLM objectives gather their rows
over the TP group as they do there (:mod:`nemo_ctcllm.llm.tp`).

Uneven shards: the LLM objectives run collectives in every batch, so every rank must see the same number of
batches. The shards differ by at most one utterance, so at most one batch; a rank that would have one batch
fewer gets one *filler* batch at the end (one utterance, the manifest's first). The model runs it like any batch
(its peers' collectives are matched) with every row marked unlabelled, so that no term reads it and no LLM
objective gathers it, and counts it nowhere (:meth:`EvalShardSampler.is_filler`): no utterance is counted
twice. Rank and world size are read from the process group when the loader is iterated (Lightning's, whichever
launcher started the job); in one process the sampler is NeMo's sequential order.

:func:`sum_over_ranks` sums named epoch totals over every rank (one all-gather of the names, one all-reduce on
the loss's device), so the model can pool them: corpus WER = word errors / reference words over every rank.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset


def _layout() -> Tuple[int, int]:
    """(global rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_of(n: int, rank: int, world: int, batch_size: int) -> Tuple[List[int], int]:
    """Rank ``rank`` of ``world`` over ``n`` utterances in batches of ``batch_size``: (its utterance indices,
    filler utterances after them: 1 where its batches would be one fewer than rank 0's, else 0)."""
    mine = list(range(rank, n, world))
    largest = _ceil_div(n, world)  # rank 0's shard
    short = _ceil_div(len(mine), batch_size) < _ceil_div(largest, batch_size)
    return mine, int(short)


class EvalShardSampler(DistributedSampler):
    """This rank's utterances of an evaluation set, in manifest order, then a filler utterance where another rank
    has one batch more (see the module docstring).

    A ``DistributedSampler`` (subclass) so that Lightning, with ``use_distributed_sampler: true``, keeps it
    instead of inserting its own, which pads by repeating utterances that would then be counted twice.
    """

    def __init__(self, dataset, batch_size: int):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)  # the real layout is read when iterated
        self.batch_size = int(batch_size)

    def shard(self) -> Tuple[List[int], int]:
        """(this rank's utterance indices, filler utterances after them: 0 or 1)."""
        rank, world = _layout()
        return shard_of(len(self.dataset), rank, world, self.batch_size)

    def real_batches(self) -> int:
        """Batches of this rank that hold its own utterances (the filler batch, if any, comes after them)."""
        mine, _ = self.shard()
        return _ceil_div(len(mine), self.batch_size)

    def is_filler(self, batch_idx: int) -> bool:
        return batch_idx >= self.real_batches()

    def __iter__(self):
        mine, filler = self.shard()
        return iter(mine + [0] * filler)

    def __len__(self) -> int:
        mine, filler = self.shard()
        return len(mine) + filler


def shard_eval_loader(loader):
    """NeMo's validation/test ``DataLoader`` re-made with an :class:`EvalShardSampler` (same dataset, batch size,
    collate function and workers; every utterance read, ``drop_last`` off). Anything else (lhotse's loaders, which
    shard by rank themselves; DALI; iterable or custom-batched datasets; None) is returned unchanged."""
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return loader
    workers = loader.num_workers
    return DataLoader(
        dataset=loader.dataset,
        batch_size=loader.batch_size,
        sampler=EvalShardSampler(loader.dataset, loader.batch_size),
        collate_fn=loader.collate_fn,
        drop_last=False,
        num_workers=workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers > 0 else None,
        persistent_workers=loader.persistent_workers if workers > 0 else False,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
    )


def sum_over_ranks(values: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Each named scalar summed over every rank (a name a rank lacks counts 0 there); float64 on ``device``.

    A collective in a multi-process job: every rank calls it at the same point. The names are agreed first (one
    ``all_gather_object``), then the values go in one all-reduce of a [names] tensor on ``device`` (NCCL takes no
    CPU tensor: pass the loss's device). One process: the values themselves."""
    _, world = _layout()
    if world == 1:
        return {k: v.detach().to(device, torch.float64).reshape(()) for k, v in values.items()}
    names: List[List[str]] = [[] for _ in range(world)]
    dist.all_gather_object(names, sorted(values))
    keys = sorted(set().union(*names))
    if not keys:  # the same union on every rank: all skip the all-reduce alike
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    local = [values[k].detach().to(device, torch.float64).reshape(()) if k in values else zero for k in keys]
    total = torch.stack(local)  # [names]
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return dict(zip(keys, total))
