"""``llm_pseudo_label``: the best of the N-best as a pseudo-label (regularizer and semi-supervised).

The maths, the YAML block and the cost: docs/objectives.md.
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
from nemo_ctcllm.objectives.shared.hypotheses import SOURCES, SearchConfig, SearchSettings, hypotheses

LOSSES = ("ctc", "margin", "both")
RANKERS = ("llm", "acoustic")


def pseudo_label_confidence(
    rank: Tensor, lengths: Tensor, best: Tensor, temperature: float, length_normalize: bool
) -> Tensor:
    """c = softmax_n(r_n / (T·L))[best] [B] (0 for a row without a valid hypothesis).

    rank [B, N] ranking scores (-inf where not valid), lengths [B, N] token counts, best [B] index of y*.
    """
    norm = lengths.gather(1, best[:, None]).to(rank) + 1.0 if length_normalize else torch.ones_like(rank[:, :1])
    post = (rank / (temperature * norm)).softmax(-1).nan_to_num(0.0)  # [B, N]
    return post.gather(1, best[:, None])[:, 0]


class LlmPseudoLabel(Objective):
    """CTC (and/or margin) loss on the best-ranked clean-pass hypothesis (docs/objectives.md)."""

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        settings: SearchSettings,
        loss: str,
        margin: float,
        confidence_threshold: float,
        labelled: bool,
        unlabelled: bool,
        every_n_steps: int = 1,
        ranker: str = "llm",
        source: str = "clean",
        confidence_temperature: float = 1.0,
        confidence_length_normalize: bool = True,
    ):
        super().__init__(name, weight, warmup_steps, every_n_steps=every_n_steps)
        self.settings = settings
        self.loss = loss
        self.margin = margin
        self.confidence_threshold = confidence_threshold
        self.use_labelled = labelled
        self.uses_unlabelled = unlabelled  # class attribute of Objective, set per instance
        self.ranker = ranker
        self.source = source
        self.confidence_temperature = confidence_temperature
        self.confidence_length_normalize = confidence_length_normalize
        self.tp_collective = ranker == "llm"  # the LLM's TP group scores together; the acoustic ranker has none

    def rows(self, ctx: StepContext) -> Tensor:
        """[B] bool: rows this objective trains on (labelled and/or unlabelled ones, as configured)."""
        B = ctx.log_probs.shape[0]
        labelled = ctx.labelled if ctx.labelled is not None else torch.ones(B, dtype=torch.bool)
        labelled = labelled.to(ctx.log_probs.device)
        return (labelled & self.use_labelled) | (~labelled & self.uses_unlabelled)

    def label(self, ctx: StepContext):
        """(hypotheses, best [B], confidence [B], acoustic top [B]) of this step (no grad but in hyps.acoustic)."""
        use_llm = self.ranker == "llm"
        hyps = hypotheses(ctx, self.settings, source=self.source, with_llm=use_llm)
        rank = hyps.teacher_combined(self.settings, self.settings.lm_weight if use_llm else 0.0)  # [B, N]
        best = rank.argmax(1)  # [B]
        top = hyps.teacher.masked_fill(~hyps.valid, float("-inf")).argmax(1)  # [B]
        confidence = pseudo_label_confidence(
            rank, hyps.lengths, best, self.confidence_temperature, self.confidence_length_normalize
        )
        return hyps, best, confidence, top

    def forward(self, ctx: StepContext) -> Tuple[Optional[Tensor], Stats]:
        hyps, best, confidence, top = self.label(ctx)
        B, N = hyps.valid.shape
        a = hyps.acoustic  # [B, N] with grad (training pass)
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
            stats = {"kept": kept.float() / max(B, 1), "confidence": confidence.mean()}
            if self.ranker == "llm":
                stats["top_changed"] = (top != best).float().mean()
        return loss, stats


@dataclass
class LlmPseudoLabelConfig(SearchConfig):
    loss: str = "ctc"  # one of LOSSES
    margin: float = 1.0  # m of the margin loss, in nats
    confidence_threshold: float = 0.0  # rows whose pseudo-label confidence c is lower are not trained on
    confidence_temperature: float = 1.0  # T in c = softmax(r / (T·L))[best]
    confidence_length_normalize: bool = True  # L = |y*| + 1 (per token) instead of 1
    ranker: str = "llm"  # llm: κ·a + λ·l; acoustic: κ·a alone (greedy self-training, no LLM)
    source: str = "clean"  # clean: N-best of an un-augmented no-grad pass; train: of the training pass
    labelled: bool = True  # train on rows with a transcript
    unlabelled: bool = False  # train on rows without one (semi-supervised)

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_choice(self.loss, f"{key}.loss", LOSSES)
        check_number(self.margin, f"{key}.margin", 0.0, 1000.0)
        check_number(self.confidence_threshold, f"{key}.confidence_threshold", 0.0, 1.0)
        check_number(self.confidence_temperature, f"{key}.confidence_temperature", 0.0, 1000.0, low_open=True)
        check_bool(self.confidence_length_normalize, f"{key}.confidence_length_normalize")
        check_choice(self.ranker, f"{key}.ranker", RANKERS)
        check_choice(self.source, f"{key}.source", SOURCES)
        check_bool(self.labelled, f"{key}.labelled")
        check_bool(self.unlabelled, f"{key}.unlabelled")
        if not (self.labelled or self.unlabelled):
            raise ConfigError(f"{key}: labelled and unlabelled are both false, so no row would be used; enable one")


@register_objective("llm_pseudo_label", LlmPseudoLabelConfig)
def build_llm_pseudo_label(cfg: LlmPseudoLabelConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    if cfg.ranker == "llm":
        require_llm(env, key)
    return [
        LlmPseudoLabel(
            "llm_pseudo_label",
            settings=SearchSettings.read(cfg, key),
            loss=cfg.loss,
            margin=float(cfg.margin),
            confidence_threshold=float(cfg.confidence_threshold),
            labelled=cfg.labelled,
            unlabelled=cfg.unlabelled,
            ranker=cfg.ranker,
            source=cfg.source,
            confidence_temperature=float(cfg.confidence_temperature),
            confidence_length_normalize=cfg.confidence_length_normalize,
            **cfg.schedule(),
        )
    ]
