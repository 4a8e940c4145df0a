"""``lang_contrastive``: language-aware contrastive loss between the soft CTC output and the reference text.

Tensor parallelism: the soft hypotheses are gathered over the TP group (every TP rank runs the LLM on the same
batch) and the gradient reaching the pooled LLM states is averaged over the group
(:func:`nemo_ctcllm.llm.tp.mean_grad_over_tp`), since every rank's contrastive loss differs (its own rows are
the queries) while megatron's backward needs one output gradient per TP group.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor

from nemo_ctcllm.llm.tp import gather_llm_inputs, mean_grad_over_tp, pad_rows
from nemo_ctcllm.objectives.base import ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.bridge import BridgeConfig, SoftHypothesis, SoftText
from nemo_ctcllm.objectives.shared.contrastive import ContrastiveConfig, TwoTowerInfoNCE
from nemo_ctcllm.objectives.shared.tensors import transcripts


def pooled_soft_hidden(host, soft: SoftText) -> Tensor:
    """Mean last hidden state of the LLM over the soft hypothesis' positions (BOS excluded) [b, H] fp32."""
    bos_ids, _ = host.tokenize([""], add_bos=True)  # [1, 1]
    bos = host.embed(bos_ids)[0].to(soft.embeds.dtype)  # [1, H]
    rows = [torch.cat([bos, soft.embeds[b, :n]]) for b, n in enumerate(soft.lengths.tolist())]  # [1+n, H]
    lengths = soft.lengths + 1  # [b]
    embeds = pad_rows(rows, soft.embeds)  # [b, L, H] (b may be 0: a rank with no row still joins the gather)
    dummy = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # [b, L]: no labels needed
    embeds, _, lengths, mine = gather_llm_inputs(embeds, dummy, lengths)  # [B, L, H], _, [B]
    if embeds.shape[0] == 0:  # no row in the whole group: no LLM call on any of its ranks
        return embeds.float().sum(1)  # [0, H], in the graph
    h = mean_grad_over_tp(host.hidden_states(embeds, lengths).float())  # [B, L, H]
    pos = torch.arange(h.shape[1], device=h.device)[None]  # [1, L]
    valid = ((pos >= 1) & (pos < lengths.to(h.device)[:, None])).float()  # [B, L]
    pooled = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # [B, H]
    return pooled[mine]


class LangContrastive(TwoTowerInfoNCE):
    """The two-tower InfoNCE between the LLM-pooled soft CTC hypothesis and the LLM-pooled reference."""

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        reader: SoftHypothesis,
        d_llm: int,
        dim: int,
        cache_text: bool,
        init_temperature: float,
        every_n_steps: int = 1,
        text_cache_size: int = 100000,
    ):
        super().__init__(
            name,
            weight,
            warmup_steps,
            d_llm,
            d_llm,
            dim,
            cache_text,
            init_temperature,
            every_n_steps=every_n_steps,
            capture_blocks=[reader.head_block] if reader.head_block else [],
            text_cache_size=text_cache_size,
        )
        self.reader = reader

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        host, texts = ctx.env.llm(), transcripts(ctx)
        soft = self.reader(ctx, host.tokenizer, host.embed, self.training)
        pooled = pooled_soft_hidden(host, soft).to(ctx.log_probs.device)  # [B, H]
        loss, stats = self.contrastive(pooled, self.text_features(host, texts), texts)
        return loss, {**stats, "hyp_tokens": soft.lengths.float().mean().detach()}


@dataclass
class LangContrastiveConfig(BridgeConfig, ContrastiveConfig):
    pass


@register_objective("lang_contrastive", LangContrastiveConfig)
def build_lang_contrastive(cfg: LangContrastiveConfig, env: ObjectiveEnv, key: str) -> List[LangContrastive]:
    return [
        LangContrastive(
            "lang_contrastive",
            reader=cfg.reader(),
            d_llm=cfg.llm_hidden_size,
            dim=cfg.dim,
            cache_text=cfg.cache_text,
            text_cache_size=cfg.text_cache_size,
            init_temperature=float(cfg.init_temperature),
            **cfg.schedule(),
        )
    ]
