"""``llm_pseudo_label``: Variant B, LLM-ranked N-best -> pseudo-label (regularizer and semi-supervised).

Per utterance the CTC N-best is ranked by the combined score s_n = κ·a_n + λ·l_n (acoustic log-probability
plus λ times the frozen LLM's log-likelihood, :mod:`nemo_ctcllm.objectives.hypotheses`); the best, y*, is
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

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from nemo_ctcllm.objectives.base import (
    ConfigError,
    Objective,
    Stats,
    StepContext,
    check_bool,
    check_choice,
    check_number,
    register_objective,
)
from nemo_ctcllm.objectives.hypotheses import SEARCH_DEFAULTS, SearchSettings, hypotheses, require_llm
from nemo_ctcllm.objectives.llm_rescoring import top_choices

LOSSES = ("ctc", "margin", "both")


class LlmPseudoLabel(Objective):
    """CTC (and/or margin) loss on the LLM-ranked best hypothesis (see the module docstring)."""

    tp_collective = True

    def __init__(self, name, weight, warmup_steps, settings: SearchSettings, loss: str, margin: float,
                 confidence_threshold: float, labelled: bool, unlabelled: bool):
        super().__init__(name, weight, warmup_steps)
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


@register_objective(
    "llm_pseudo_label",
    defaults={**SEARCH_DEFAULTS, "loss": "ctc", "margin": 1.0, "confidence_threshold": 0.0, "labelled": True,
              "unlabelled": False},
)
def build_llm_pseudo_label(block: DictConfig, model, key: str) -> List[Objective]:
    settings = SearchSettings.read(block, key)
    loss = check_choice(block.loss, f"{key}.loss", LOSSES)
    margin = check_number(block.margin, f"{key}.margin", 0.0, 1000.0)
    threshold = check_number(block.confidence_threshold, f"{key}.confidence_threshold", 0.0, 1.0)
    labelled = check_bool(block.labelled, f"{key}.labelled")
    unlabelled = check_bool(block.unlabelled, f"{key}.unlabelled")
    if not (labelled or unlabelled):
        raise ConfigError(f"{key}: labelled and unlabelled are both false, so no row would be used; enable one")
    require_llm(model, key)
    return [LlmPseudoLabel("llm_pseudo_label", block.weight, block.warmup_steps, settings, loss, margin,
                           threshold, labelled, unlabelled)]
