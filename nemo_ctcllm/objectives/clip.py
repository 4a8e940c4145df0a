"""``clip``: CLIP-style audio-text contrastive loss between the encoder and a frozen text encoder.

    audio side  a_b = normalize( W_a pool(encoded_b) )          pool: mean over valid frames, or attention
                                                                 pooling with a learned query (zero init =
                                                                 mean pooling)
    text side   t_b = normalize( W_t f(text_b) )                 f: the frozen LLM's mean last hidden state
                                                                 (``LLMHost.pooled_hidden``), no grad
    logits      S_ij = exp(s) * a_i . t_j,   s = log(1/temperature) learned, init log(1/0.07),
                                             clamped to s <= log(100) as in CLIP (temperature >= 0.01)
    loss        1/2 [ CE_i(S_i., i) + CE_i(S_.i^T, i) ]          (symmetric InfoNCE, mean over rows)

In-batch negatives are gathered over all ranks, the encoder's data-parallel group (OpenCLIP's "local loss"): rank r scores
its own rows as queries against every rank's rows as keys; the audio rows are gathered differentiably
(:func:`nemo_ctcllm.llm.tp.gather_rows`: backward sums over ranks and returns this rank's rows), the
text *features* are gathered without grad and projected locally by every rank with the same W_t. With
DDP averaging gradients, every parameter then receives the gradient of the global-batch loss.

Utterances that share a transcript (several voices reading one sentence) are not negatives of each
other: those off-diagonal logits are masked out (-inf) in both directions.

Text features depend only on the text (the LLM is frozen), so with ``cache_text`` they are kept per
transcript on CPU ({text: [H] fp32}, ~2.3 KB per sentence for a 576-wide LLM). Under tensor parallelism the
transcripts are first gathered within the TP group, so every TP rank asks the LLM for the same (missing)
texts and caches all of them: the caches stay identical across the group and the LLM is either called by
every rank of the group or by none.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from nemo_ctcllm.llm.tp import dp_group, gather_objects, gather_rows
from nemo_ctcllm.objectives.common import length_mask, masked_mean, resolve_llm_hidden_size, transcripts
from nemo_ctcllm.objectives.base import (
    ConfigError,
    Objective,
    StepContext,
    Stats,
    check_choice,
    check_int,
    check_number,
    register_objective,
)

POOLS = ("mean", "attention")
TEXT_ENCODERS = ("llm",)  # the frozen LLM (model.llm); the key is kept for configs that name it
MAX_LOGIT_SCALE = math.log(100.0)


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


def text_keys(texts: Sequence[str]) -> Tensor:
    """A 64-bit hash per transcript [b] (long), to find equal transcripts across ranks."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts],
        dtype=torch.long,
    )


class ClipObjective(Objective):
    """Symmetric InfoNCE between pooled encoder output and frozen-LLM transcript embeddings."""

    def __init__(self, name, weight, warmup_steps, d_audio: int, d_text: int, dim: int, pool: str,
                 cache_text: bool, init_temperature: float):
        super().__init__(name, weight, warmup_steps)
        self.attn_pool = AttentionPool(d_audio) if pool == "attention" else None
        self.audio_proj = nn.Linear(d_audio, dim)
        self.text_proj = nn.Linear(d_text, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.cache_text = cache_text
        self._text_cache: Dict[str, Tensor] = {}  # text -> [H] fp32 on CPU; plain dict: not in state_dict

    def pooled_audio(self, encoded: Tensor, lengths: Tensor) -> Tensor:
        """encoded [B, D, T], lengths [B] -> [B, D] (before the projection)."""
        return self.attn_pool(encoded, lengths) if self.attn_pool is not None else masked_mean(encoded, length_mask(lengths, encoded.shape[2])[:, None], dim=2)

    @torch.no_grad()
    def text_features(self, host, texts: Sequence[str]) -> Tensor:
        """Frozen-LLM features of this rank's transcripts [b, H] fp32 (TP-safe, cached; see module docstring)."""
        all_texts, rows = gather_objects(texts)  # identical list on every rank of the TP group
        if not self.cache_text:
            return host.pooled_hidden(all_texts).float()[rows]
        missing = sorted({t for t in all_texts if t not in self._text_cache})
        if missing:
            for t, f in zip(missing, host.pooled_hidden(missing).float().cpu()):
                self._text_cache[t] = f
        return torch.stack([self._text_cache[t] for t in texts])

    def contrastive(self, pooled: Tensor, text_feats: Tensor, texts: Sequence[str]) -> Tuple[Tensor, Stats]:
        """pooled [b, D] audio, text_feats [b, H] -> (symmetric InfoNCE over the DP-gathered batch, stats)."""
        g = dp_group()
        a = F.normalize(self.audio_proj(pooled), dim=-1)  # [b, d]
        a_all, rows = gather_rows(a, g)  # [N, d]; grad returns to this rank's rows
        feats_all, _ = gather_rows(text_feats.to(a), g)  # [N, H], no grad
        keys_all, _ = gather_rows(text_keys(texts).to(a.device), g)  # [N]
        t_all = F.normalize(self.text_proj(feats_all), dim=-1)  # [N, d]
        t = t_all[rows]  # [b, d]
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        target = torch.arange(rows.start, rows.stop, device=a.device)  # [b]: the positive's column
        cols = torch.arange(a_all.shape[0], device=a.device)  # [N]
        same_text = (keys_all[rows][:, None] == keys_all[None, :]) & (cols[None] != target[:, None])  # [b, N]
        logits_a2t = (scale * a @ t_all.T).masked_fill(same_text, float("-inf"))  # [b, N]
        logits_t2a = (scale * t @ a_all.T).masked_fill(same_text, float("-inf"))  # [b, N]
        loss = 0.5 * (F.cross_entropy(logits_a2t, target) + F.cross_entropy(logits_t2a, target))
        acc = (logits_a2t.argmax(-1) == target).float().mean()
        return loss, {"acc": acc.detach(), "temperature": (1.0 / scale).detach()}

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        texts = transcripts(ctx)
        pooled = self.pooled_audio(ctx.encoded, ctx.encoded_len)  # [B, D]
        return self.contrastive(pooled, self.text_features(ctx.model.llm, texts), texts)


@register_objective(
    "clip",
    defaults={"dim": 256, "pool": "mean", "text_encoder": "llm", "cache_text": True, "init_temperature": 0.07,
              "llm_hidden_size": None},
)
def build_clip(block: DictConfig, model, key: str) -> List[Objective]:
    dim = check_int(block.dim, f"{key}.dim", 1)
    check_choice(block.pool, f"{key}.pool", POOLS)
    check_choice(block.text_encoder, f"{key}.text_encoder", TEXT_ENCODERS)
    if not isinstance(block.cache_text, bool):
        raise ConfigError(f"{key}.cache_text must be true or false, got {block.cache_text!r}")
    temp = check_number(block.init_temperature, f"{key}.init_temperature", 0.01, 1.0)  # CLIP's clamp
    d_text = resolve_llm_hidden_size(model, block, key)
    d_audio = model.decoder._feat_in  # width of ctx.encoded
    return [ClipObjective("clip", block.weight, block.warmup_steps, d_audio, d_text, dim, block.pool,
                          block.cache_text, float(temp))]
