"""``llm_pseudo_label``: Variant B, LLM-ranked N-best -> pseudo-label (regularizer and semi-supervised).

Per utterance the CTC N-best is ranked by the combined score s_n = κ·a_n + λ·l_n (acoustic log-probability
plus λ times the frozen LLM's log-likelihood, :mod:`nemo_ctcllm.objectives.shared.hypotheses`); the best, y*, is
the pseudo-label and its posterior P* = softmax_n(s_n)[*] over the N-best is its confidence. Rows with
P* >= ``confidence_threshold`` are kept (the filtering of noisy-student / pseudo-labelling, e.g. Kahn et al.
2020, arXiv 1909.09116; Higuchi et al. 2021, arXiv 2104.08416) and trained with

    ``ctc``     L_b = -log p_CTC(y* | x)                     (CTC loss on the pseudo-label)
    ``margin``  L_b = mean_{n != *} max(0, m - (a_* - a_n))    (prefer y* over the other hypotheses by m nats)
    ``both``    their sum;        loss = mean over kept rows (0 when none is kept)

Two uses (both may be on): ``labelled: true`` applies it to rows that have a transcript (a regularizer that
pulls the model towards the LLM-preferred reading of its own N-best); ``unlabelled: true`` applies it to rows
without one: manifest lines with no ``text`` key (semi-supervised training). With ``unlabelled: true`` the
model marks rows with an empty target as unlabelled (``StepContext.labelled``) and every objective that needs
a reference (CTC heads, ...) sees only the labelled rows (:func:`nemo_ctcllm.objectives.base.compose_loss`).
The search and the LLM run without gradients; the loss reaches the encoder through a_n = -CTC(y_n).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_ctcllm.config import ConfigError, check_bool, check_choice, check_number
from nemo_ctcllm.objectives.base import Objective, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.checks import require_llm
from nemo_ctcllm.objectives.shared.hypotheses import SearchConfig, SearchSettings, hypotheses, top_choices

LOSSES = ("ctc", "margin", "both")


class LlmPseudoLabel(Objective):
    """CTC (and/or margin) loss on the LLM-ranked best hypothesis (see the module docstring)."""

    tp_collective = True

    def __init__(self, name, weight, warmup_steps, settings: SearchSettings, loss: str, margin: float,
                 confidence_threshold: float, labelled: bool, unlabelled: bool, every_n_steps: int = 1):
        super().__init__(name, weight, warmup_steps, every_n_steps=every_n_steps)
        self.settings = settings
        self.loss = loss
        self.margin = margin
        self.confidence_threshold = confidence_threshold
        self.use_labelled = labelled
        self.uses_unlabelled = unlabelled  # class attribute of Objective, set per instance

    def rows(self, ctx: StepContext) -> Tensor:
        """[B] bool: rows this objective trains on (labelled and/or unlabelled ones, as configured)."""
        B = ctx.log_probs.shape[0]
        labelled = ctx.labelled if ctx.labelled is not None else torch.ones(B, dtype=torch.bool)
        labelled = labelled.to(ctx.log_probs.device)
        return (labelled & self.use_labelled) | (~labelled & self.uses_unlabelled)

    def forward(self, ctx: StepContext) -> Tuple[Optional[Tensor], Stats]:
        hyps = hypotheses(ctx, self.settings)
        B, N = hyps.valid.shape
        a = hyps.acoustic  # [B, N] with grad
        top, best = top_choices(hyps, self.settings)  # [B], [B]
        confidence = hyps.posterior(self.settings).detach().gather(1, best[:, None])[:, 0]  # [B]
        keep = self.rows(ctx) & hyps.valid[:, 0] & (confidence >= self.confidence_threshold)  # [B]
        a_best = a.gather(1, best[:, None])  # [B, 1]
        per_row = a.new_zeros(B)
        if self.loss in ("ctc", "both"):
            per_row = per_row - a_best[:, 0]
        if self.loss in ("margin", "both"):
            others = hyps.valid & (torch.arange(N, device=a.device)[None] != best[:, None])  # [B, N]
            hinge = F.relu(self.margin - (a_best - a)) * others  # [B, N]
            per_row = per_row + hinge.sum(1) / others.sum(1).clamp(min=1)
        kept = keep.sum()
        loss = (per_row * keep).sum() / kept.clamp(min=1)
        stats: Stats = {}
        if B:
            stats = {
                "kept": kept.float() / max(B, 1),
                "confidence": confidence.mean(),
                "top_changed": (top != best).float().mean(),
            }
        return loss, stats


@dataclass
class LlmPseudoLabelConfig(SearchConfig):
    loss: str = "ctc"  # one of LOSSES
    margin: float = 1.0  # m of the margin loss, in nats
    confidence_threshold: float = 0.0  # rows whose pseudo-label posterior P* is lower are not trained on
    labelled: bool = True  # train on rows with a transcript
    unlabelled: bool = False  # train on rows without one (semi-supervised)

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_choice(self.loss, f"{key}.loss", LOSSES)
        check_number(self.margin, f"{key}.margin", 0.0, 1000.0)
        check_number(self.confidence_threshold, f"{key}.confidence_threshold", 0.0, 1.0)
        check_bool(self.labelled, f"{key}.labelled")
        check_bool(self.unlabelled, f"{key}.unlabelled")
        if not (self.labelled or self.unlabelled):
            raise ConfigError(f"{key}: labelled and unlabelled are both false, so no row would be used; enable one")


@register_objective("llm_pseudo_label", LlmPseudoLabelConfig)
def build_llm_pseudo_label(cfg: LlmPseudoLabelConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    require_llm(env, key)
    return [LlmPseudoLabel("llm_pseudo_label", settings=SearchSettings.read(cfg, key), loss=cfg.loss,
                           margin=float(cfg.margin), confidence_threshold=float(cfg.confidence_threshold),
                           labelled=cfg.labelled, unlabelled=cfg.unlabelled, **cfg.schedule())]
