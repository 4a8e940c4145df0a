"""Masks and masked means over padded batches, and the transcript text.

The ASR vocabulary (SentencePiece) is not the LLM's, so text crosses over as *text*: the batch's target
ids are detokenized with the ASR tokenizer and re-tokenized by the consumer.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch

from nemo_ctcllm.objectives.base import StepContext


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """lengths [B] -> mask [B, size], True on valid positions (t < length)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Union[int, Tuple[int, ...]] = -1) -> torch.Tensor:
    """Mean of x over ``dim`` where mask (same shape as x) is True; 0 where nothing is valid."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def transcripts(ctx: StepContext) -> List[str]:
    """Ground-truth transcripts of the batch: ``ids_to_text`` of ``targets[b, :target_len[b]]`` per row."""
    tok = ctx.env.tokenizer
    rows = ctx.targets.tolist()  # [B][U]
    return [tok.ids_to_text(row[:n]) for row, n in zip(rows, ctx.target_len.tolist())]
