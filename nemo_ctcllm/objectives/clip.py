"""``clip``: CLIP-style audio-text contrastive loss between the encoder and a frozen text encoder.

The InfoNCE (in-batch negatives gathered over every rank, duplicate transcripts masked, the cached
transcript features) is :mod:`nemo_ctcllm.objectives.shared.contrastive`'s.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor, nn

from nemo_ctcllm.config import check_choice
from nemo_ctcllm.objectives.base import Objective, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.contrastive import ContrastiveConfig, TwoTowerInfoNCE
from nemo_ctcllm.objectives.shared.tensors import length_mask, masked_mean, transcripts

POOLS = ("mean", "attention")
TEXT_ENCODERS = ("llm",)  # the frozen LLM (model.llm); the key is kept for configs that name it


class AttentionPool(nn.Module):
    """pooled = sum_t softmax_t(q . x_t / sqrt(D)) x_t over valid frames; q learned (zero init: mean pool)."""

    def __init__(self, d: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x [B, D, T], lengths [B] -> [B, D]."""
        scores = torch.einsum("d,bdt->bt", self.query, x) / math.sqrt(x.shape[1])  # [B, T]
        pad = torch.arange(x.shape[2], device=x.device)[None] >= lengths[:, None]  # [B, T]
        attn = scores.masked_fill(pad, float("-inf")).softmax(-1)  # [B, T]
        return torch.einsum("bt,bdt->bd", attn, x)


class ClipObjective(TwoTowerInfoNCE):
    """Symmetric InfoNCE between pooled encoder output and frozen-LLM transcript embeddings."""

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        d_audio: int,
        d_text: int,
        dim: int,
        pool: str,
        cache_text: bool,
        init_temperature: float,
        every_n_steps: int = 1,
        text_cache_size: int = 100000,
    ):
        super().__init__(
            name,
            weight,
            warmup_steps,
            d_audio,
            d_text,
            dim,
            cache_text,
            init_temperature,
            every_n_steps=every_n_steps,
            text_cache_size=text_cache_size,
        )
        self.attn_pool = AttentionPool(d_audio) if pool == "attention" else None

    def pooled_audio(self, encoded: Tensor, lengths: Tensor) -> Tensor:
        """encoded [B, D, T], lengths [B] -> [B, D] (before the projection)."""
        if self.attn_pool is not None:
            return self.attn_pool(encoded, lengths)
        return masked_mean(encoded, length_mask(lengths, encoded.shape[2])[:, None], dim=2)

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        texts = transcripts(ctx)
        pooled = self.pooled_audio(ctx.encoded, ctx.encoded_len)  # [B, D]
        return self.contrastive(pooled, self.text_features(ctx.env.llm(), texts), texts)


@dataclass
class ClipConfig(ContrastiveConfig):
    pool: str = "mean"  # one of POOLS
    text_encoder: str = "llm"  # one of TEXT_ENCODERS

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_choice(self.pool, f"{key}.pool", POOLS)
        check_choice(self.text_encoder, f"{key}.text_encoder", TEXT_ENCODERS)


@register_objective("clip", ClipConfig)
def build_clip(cfg: ClipConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    return [
        ClipObjective(
            "clip",
            d_audio=env.encoded_width,
            d_text=cfg.llm_hidden_size,
            dim=cfg.dim,
            pool=cfg.pool,
            cache_text=cfg.cache_text,
            text_cache_size=cfg.text_cache_size,
            init_temperature=float(cfg.init_temperature),
            **cfg.schedule(),
        )
    ]
