"""``llm_rescoring``: language-aware training by in-training reranking with the frozen LLM (MWER-style).

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from nemo_ctcllm.config import check_bool
from nemo_ctcllm.objectives.base import Objective, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.checks import require_llm
from nemo_ctcllm.objectives.shared.hypotheses import SearchConfig, SearchSettings, hypotheses, top_choices, word_errors
from nemo_ctcllm.objectives.shared.tensors import masked_mean, transcripts


class LlmRescoring(Objective):
    """Expected word errors under the LLM-rescored N-best posterior (docs/objectives.md)."""

    tp_collective = True

    def __init__(
        self, name, weight, warmup_steps, settings: SearchSettings, normalize_risk: bool, every_n_steps: int = 1
    ):
        super().__init__(name, weight, warmup_steps, every_n_steps=every_n_steps)
        self.settings = settings
        self.normalize_risk = normalize_risk

    def forward(self, ctx: StepContext) -> Tuple[Optional[torch.Tensor], Stats]:
        hyps = hypotheses(ctx, self.settings)  # also on 0 rows: the LLM's TP group scores together
        B = hyps.valid.shape[0]
        if B == 0:
            return hyps.acoustic.sum(), {}
        errors, ref_words = word_errors(hyps.texts, transcripts(ctx))  # [B, N], [B]
        errors, ref_words = errors.to(hyps.acoustic), ref_words.to(hyps.acoustic)
        risk = errors / ref_words.clamp(min=1)[:, None] if self.normalize_risk else errors  # [B, N]
        post = hyps.posterior(self.settings)  # [B, N], grad through the acoustic scores
        baseline = masked_mean(risk, hyps.valid, dim=1)  # [B]
        loss = (post * (risk - baseline[:, None])).sum() / B
        rows = torch.arange(B, device=risk.device)
        top, rescored = top_choices(hyps, self.settings)
        words = ref_words.sum().clamp(min=1)
        return loss, {
            "expected_risk": (post * risk).sum(1).mean().detach(),
            "wer_acoustic_top": errors[rows, top].sum() / words,
            "wer_rescored_top": errors[rows, rescored].sum() / words,
            "top_changed": (top != rescored).float().mean(),
        }


@dataclass
class LlmRescoringConfig(SearchConfig):
    normalize_risk: bool = False  # word errors divided by the reference's word count

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_bool(self.normalize_risk, f"{key}.normalize_risk")


@register_objective("llm_rescoring", LlmRescoringConfig)
def build_llm_rescoring(cfg: LlmRescoringConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    require_llm(env, key)
    return [
        LlmRescoring(
            "llm_rescoring", settings=SearchSettings.read(cfg, key), normalize_risk=cfg.normalize_risk, **cfg.schedule()
        )
    ]
