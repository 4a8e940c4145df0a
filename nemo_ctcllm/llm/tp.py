"""Row gathering for objectives that feed the tensor-parallel LLM (or need in-batch negatives across ranks).

Why: every rank of a tensor-parallel (TP) group must feed the LLM *identical* inputs (its all-reduces would
otherwise mix different utterances), but the data loader gives every rank its own utterances. An objective
therefore all-gathers its LLM inputs within the TP group, runs the LLM on the concatenated batch on every
rank, and keeps the gradient of its own rows:

    forward   X = [x_1; x_2; ...; x_N]          (rows of every rank, padded along the sequence dim
                                                to the group max; pad value 0 / -100 for labels)
    backward  dx_r = ( sum_s dL_s/dX )[rows of r]   (all-reduce SUM, then this rank's slice; gloo has no
                                                reduce_scatter, so all_reduce + slice is used)

This is the exact adjoint of all-gather when the total objective is sum_s L_s (one loss per rank). Under TP
every rank computes the *same* loss L on the gathered batch, so dx_r = N * dL/dx_r. With L the mean over
the gathered batch (N*b rows of equal size), L = (1/N) sum_s L(own batch of s) and so
N * dL/dx_r = d L(own batch of r)/dx_r: each rank gets the same gradient scale as TP=1 on its own batch
(exactly so when all ranks hold the same number of counted rows/tokens; otherwise rows are weighted by
the token-level mean over the group).

The same gather serves the data-parallel (DP) side of a contrastive loss (:func:`dp_group`, all ranks): there each
rank's loss L_r differs (its own rows as queries against all rows as keys), the backward above gives
rank r the gradient of sum_s L_s w.r.t. its rows, and DDP's mean over ranks turns that into the gradient
of the global mean.

At group size 1 every helper is a no-op: no collective is ever called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """A process group handle with this rank's position in it (``group=None`` means size 1, no comms)."""

    group: Optional[object]
    size: int
    rank: int


SINGLE = Group(None, 1, 0)


def _megatron_ready() -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def tp_group() -> Group:
    """The LLM's tensor-parallel group (megatron ``parallel_state``), or :data:`SINGLE`."""
    if not _megatron_ready():
        return SINGLE
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return SINGLE
    return Group(
        parallel_state.get_tensor_model_parallel_group(), size, parallel_state.get_tensor_model_parallel_rank()
    )


def dp_group() -> Group:
    """The encoder's data-parallel group: every rank (the whole default group), or :data:`SINGLE`.

    In this project the encoder is replicated on every rank and trained data-parallel over *all* ranks
    (:mod:`nemo_ctcllm.parallel`); megatron's ``get_data_parallel_group()`` holds only the ranks with the same
    TP rank, which would leave the TP peers' utterances out of a contrastive loss's negatives.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return Group(dist.group.WORLD, dist.get_world_size(), dist.get_rank())


def _sizes(x: Tensor, g: Group) -> List[Tuple[int, ...]]:
    """Shapes of ``x`` on every rank of the group (same number of dims everywhere)."""
    mine = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    out = [torch.empty_like(mine) for _ in range(g.size)]
    dist.all_gather(out, mine, group=g.group)
    return [tuple(s.tolist()) for s in out]


def _pad_to(x: Tensor, shape: Sequence[int], value) -> Tensor:
    """Right-pad every dim of ``x`` up to ``shape`` with ``value``."""
    out = x.new_full(tuple(shape), value)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def _gather(x: Tensor, g: Group, shapes: List[Tuple[int, ...]], value) -> Tensor:
    """x [b, L, ...] -> [sum_r b_r, L_max, ...]: non-row dims right-padded with ``value`` to the group max."""
    top = [max(s[d] for s in shapes) for d in range(x.dim())]
    padded = _pad_to(x.contiguous(), top, value)  # [b_max, L_max, ...]
    parts = [torch.empty_like(padded) for _ in range(g.size)]
    dist.all_gather(parts, padded, group=g.group)
    return torch.cat([p[: s[0]] for p, s in zip(parts, shapes)])


class _GatherRows(torch.autograd.Function):
    """All-gather rows forward; all-reduce SUM and take this rank's slice backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Group, shapes, offset: int, value) -> Tensor:
        ctx.g, ctx.shape, ctx.offset = g, tuple(x.shape), offset
        return _gather(x, g, shapes, value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()  # [B, L_max, ...]
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.g.group)
        rows = grad[ctx.offset : ctx.offset + ctx.shape[0]]  # [b, L_max, ...]
        return rows[tuple(slice(0, n) for n in ctx.shape)].contiguous(), None, None, None, None


def gather_rows(x: Tensor, g: Group, value=0) -> Tuple[Tensor, slice]:
    """Concatenate the rows of ``x`` [b, ...] over the group, padding other dims with ``value``.

    Differentiable (adjoint described in the module docstring) when ``x`` requires grad. Returns the gathered
    tensor [sum_r b_r, ...] and the slice of this rank's rows in it. No-op at group size 1.
    """
    if g.size == 1:
        return x, slice(0, x.shape[0])
    shapes = _sizes(x, g)
    offset = sum(s[0] for s in shapes[: g.rank])
    rows = slice(offset, offset + x.shape[0])
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, g, shapes, offset, value), rows
    return _gather(x, g, shapes, value), rows


def gather_llm_inputs(
    embeds: Tensor, labels: Tensor, lengths: Tensor, g: Optional[Group] = None
) -> Tuple[Tensor, Tensor, Tensor, slice]:
    """Make the LLM inputs identical on every rank of the TP group.

    embeds [b, L, H] (grad flows back to this rank's rows), labels [b, L] (padded with -100),
    lengths [b] -> embeds [B, L_max, H], labels [B, L_max], lengths [B], this rank's rows (B = sum of b).
    """
    g = tp_group() if g is None else g
    embeds, rows = gather_rows(embeds, g, 0.0)
    labels, _ = gather_rows(labels, g, -100)
    lengths, _ = gather_rows(lengths, g, 0)
    return embeds, labels, lengths, rows


def gather_objects(items: Sequence, g: Optional[Group] = None) -> Tuple[list, slice]:
    """Concatenate python lists (e.g. transcripts) over the group (TP by default); returns (all, my rows)."""
    g = tp_group() if g is None else g
    items = list(items)
    if g.size == 1:
        return items, slice(0, len(items))
    parts = [None] * g.size
    dist.all_gather_object(parts, items, group=g.group)
    offset = sum(len(p) for p in parts[: g.rank])
    return [x for p in parts for x in p], slice(offset, offset + len(items))


class _MeanGrad(torch.autograd.Function):
    """Identity forward; backward: the mean of the incoming gradient over the group."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Group) -> Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.g.group)
        return grad / ctx.g.size, None


def mean_grad_over_tp(x: Tensor, g: Optional[Group] = None) -> Tensor:
    """Make the gradient reaching an LLM *output* identical on every TP rank (its mean over the group).

    Megatron's tensor-parallel backward assumes every TP rank back-propagates the same output gradient. An
    objective whose per-rank loss differs (e.g. a contrastive loss whose queries are this rank's rows) breaks
    that; with this on the LLM output, rank r back-propagates (1/N) sum_s dL_s/dy, the LLM returns
    (1/N) d(sum_s L_s)/dX on every rank, and :func:`gather_rows`' backward (sum over the group, own slice)
    then gives rank r the gradient of sum_s L_s w.r.t. its own rows, as at TP=1 with DP. No-op at size 1.
    """
    g = tp_group() if g is None else g
    if g.size == 1 or not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _MeanGrad.apply(x, g)


def pad_rows(rows: List[Tensor], like: Tensor, value=0) -> Tensor:
    """``pad_sequence(rows, batch_first=True)`` [b, L, ...]; with no row (a rank with nothing to feed), an empty
    [0, 0, ...] tensor shaped and typed as ``like`` [b, P, ...] and, if ``like`` requires grad, in its graph, so
    that :func:`gather_rows` still builds the differentiable gather whose backward all-reduce the peers run."""
    if rows:
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)
    empty = like.new_full((0, 0) + tuple(like.shape[2:]), value)  # [0, 0, ...]
    return empty + like.sum() * 0 if like.requires_grad else empty
