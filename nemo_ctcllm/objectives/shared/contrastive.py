"""The two-tower InfoNCE of ``clip`` and ``lang_contrastive``: a query side (pooled audio, or the LLM's reading
of the CTC hypothesis) against frozen-LLM transcript features.

    a_b = normalize(W_a x_b),  t_b = normalize(W_t f(text_b))     f: the frozen LLM's mean last hidden state
                                                                  (``LLMHost.pooled_hidden``), no grad
    S_ij = exp(s) * a_i . t_j,   s = log(1/temperature) learned, clamped to s <= log(100) as in CLIP
    loss = 1/2 [ CE_i(S_i., i) + CE_i(S_.i^T, i) ]               (symmetric InfoNCE, mean over rows)

In-batch negatives are gathered over all ranks, the encoder's data-parallel group (OpenCLIP's "local loss"):
rank r scores its own rows as queries against every rank's rows as keys; the query rows are gathered
differentiably (:func:`nemo_ctcllm.llm.tp.gather_rows`: backward sums over ranks and returns this rank's rows),
the text *features* are gathered without grad and projected locally by every rank with the same W_t. With DDP
averaging gradients, every parameter then receives the gradient of the global-batch loss.

Utterances that share a transcript (several voices reading one sentence) are not negatives of each other: those
off-diagonal logits are masked out (-inf) in both directions.

Text features depend only on the text (the LLM is frozen), so with ``cache_text`` they are kept per transcript on
CPU ({text: [H] fp32}, ~2.3 KB per sentence for a 576-wide LLM, 16 KB for an 8B one), at most
``text_cache_size`` of them (the oldest go first). Under tensor parallelism the transcripts are
first gathered within the TP group, so every TP rank asks the LLM for the same (missing) texts and caches all of
them: the caches stay identical across the group (eviction follows insertion order, which the group shares, not
each rank's own reads) and the LLM is either called by every rank of the group or by none.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nemo_ctcllm.config import check_bool, check_int, check_number
from nemo_ctcllm.llm.tp import dp_group, gather_objects, gather_rows
from nemo_ctcllm.objectives.base import Objective, ObjectiveConfig, ObjectiveEnv, Stats
from nemo_ctcllm.objectives.shared.checks import check_llm_hidden_size

MAX_LOGIT_SCALE = math.log(100.0)


def text_keys(texts: Sequence[str]) -> Tensor:
    """A 64-bit hash per transcript [b] (long), to find equal transcripts across ranks."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts],
        dtype=torch.long,
    )


@dataclass
class ContrastiveConfig(ObjectiveConfig):
    """The keys of the two-tower InfoNCE."""

    dim: int = 256  # width of the shared space
    cache_text: bool = True  # keep each transcript's LLM features (CPU)
    text_cache_size: int = 100000  # at most this many transcripts cached (1.6 GB at an 8B LLM's width)
    init_temperature: float = 0.07  # learned; CLIP's initial value
    llm_hidden_size: Optional[int] = None  # null: read from model.llm.checkpoint at construction

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_int(self.dim, f"{key}.dim", 1)
        check_bool(self.cache_text, f"{key}.cache_text")
        check_int(self.text_cache_size, f"{key}.text_cache_size", 1)
        check_number(self.init_temperature, f"{key}.init_temperature", 0.01, 1.0)  # CLIP's clamp
        check_llm_hidden_size(self.llm_hidden_size, f"{key}.llm_hidden_size")


class TwoTowerInfoNCE(Objective):
    """Projections of both sides, the learned temperature, the transcript-feature cache and the loss."""

    tp_collective = True  # LLM (TP) and cross-rank gathers: runs on every rank, also with no row

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        d_query: int,
        d_text: int,
        dim: int,
        cache_text: bool,
        init_temperature: float,
        every_n_steps: int = 1,
        capture_blocks=None,
        text_cache_size: int = 100000,
    ):
        super().__init__(name, weight, warmup_steps, capture_blocks=capture_blocks, every_n_steps=every_n_steps)
        self.audio_proj = nn.Linear(d_query, dim)
        self.text_proj = nn.Linear(d_text, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.cache_text = cache_text
        self.text_cache_size = text_cache_size
        self._text_cache: Dict[str, Tensor] = {}  # text -> [H] fp32 on CPU; plain dict: not in state_dict

    @torch.no_grad()
    def text_features(self, host, texts: Sequence[str]) -> Tensor:
        """Frozen-LLM features of this rank's transcripts [b, H] fp32 (TP-safe, cached; see module docstring)."""
        all_texts, rows = gather_objects(texts)  # identical list on every rank of the TP group
        if not all_texts:  # no row in the whole TP group: no rank calls the LLM
            return torch.zeros(0, self.text_proj.in_features)  # [0, H]
        if not self.cache_text:  # every rank of the group calls the LLM, also one with no row
            return host.pooled_hidden(all_texts).float()[rows]
        missing = sorted({t for t in all_texts if t not in self._text_cache})
        if missing:  # the same texts on every rank of the group: they call the LLM together and cache alike
            for t, f in zip(missing, host.pooled_hidden(missing).float().cpu()):
                self._text_cache[t] = f
        out = torch.stack([self._text_cache[t] for t in texts]) if texts else torch.zeros(0, self.text_proj.in_features)
        while len(self._text_cache) > self.text_cache_size:  # oldest first (dicts keep insertion order)
            del self._text_cache[next(iter(self._text_cache))]
        return out

    def contrastive(self, pooled: Tensor, text_feats: Tensor, texts: Sequence[str]) -> Tuple[Tensor, Stats]:
        """pooled [b, D] queries, text_feats [b, H] -> (symmetric InfoNCE over the DP-gathered batch, stats)."""
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
        if a.shape[0] == 0:  # no query row on this rank: zero, in the graph of the gathered rows (whose backward
            return 0.0 * (logits_a2t.sum() + logits_t2a.sum()), {}  # all-reduce every rank runs)
        loss = 0.5 * (F.cross_entropy(logits_a2t, target) + F.cross_entropy(logits_t2a, target))
        acc = (logits_a2t.argmax(-1) == target).float().mean()
        return loss, {"acc": acc.detach(), "temperature": (1.0 / scale).detach()}
