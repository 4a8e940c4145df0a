"""``llm_reward``: Variant A, Total = CTC - λ·E[log p_LLM(text)], by REINFORCE (Williams 1992).

The loss returned has the value -E[r] (mean reward of the samples / expected reward under P) and the
gradient of the REINFORCE surrogate (``value + surrogate - surrogate.detach()``). The LLM is frozen and sampled
texts are scored without gradient; gradients reach the encoder through the CTC log-probabilities only.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from nemo_ctcllm.config import ConfigError, check_choice, check_int, check_number
from nemo_ctcllm.decoding.nbest import collapse_paths
from nemo_ctcllm.objectives.base import Objective, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.checks import require_llm
from nemo_ctcllm.objectives.shared.hypotheses import (
    MAX_NBEST,
    NBestConfig,
    SearchSettings,
    hypotheses,
    llm_log_likelihood,
    word_errors,
)
from nemo_ctcllm.objectives.shared.tensors import length_mask, transcripts

SOURCES = ("sample", "nbest")
BASELINES = ("none", "batch_mean", "utterance_mean")


def mean_of_others(r: Tensor, valid: Tensor, dim, leave_one_out: bool) -> Tensor:
    """Mean of the valid entries of r along ``dim`` -- with ``leave_one_out`` of the *other* ones (0 where
    there is no other) -- broadcast to r's shape."""
    v = valid.to(r.dtype)
    total, count = (r * v).sum(dim, keepdim=True), v.sum(dim, keepdim=True)
    if not leave_one_out:
        return (total / count.clamp(min=1)).expand_as(r)
    return torch.where(count - v > 0, (total - r * v) / (count - v).clamp(min=1), torch.zeros_like(r))


def baseline_of(r: Tensor, valid: Tensor, kind: str, leave_one_out: bool) -> Tensor:
    """Baseline [B, S] for rewards r [B, S] (docs/objectives.md)."""
    if kind == "none":
        return torch.zeros_like(r)
    return mean_of_others(r, valid, (0, 1) if kind == "batch_mean" else 1, leave_one_out)


def sample_paths(log_probs: Tensor, lengths: Tensor, num: int, generator=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Draw S = ``num`` CTC paths per utterance (blank = C-1). log_probs [B, T, C], lengths [B] ->
    path log-probabilities [B, S] (grad), collapsed label ids [B*S, L] and their lengths [B*S]."""
    B, T, C = log_probs.shape
    probs = log_probs.detach().float().exp().reshape(B * T, C)  # [B*T, C]
    paths = torch.multinomial(probs, num, replacement=True, generator=generator)  # [B*T, S]
    paths = paths.view(B, T, num).transpose(1, 2)  # [B, S, T]
    frame_lp = log_probs.gather(2, paths.transpose(1, 2)).transpose(1, 2)  # [B, S, T]
    valid = length_mask(lengths, T)[:, None, :]  # [B, 1, T]
    path_lp = (frame_lp * valid).sum(-1)  # [B, S]
    ids, id_len = collapse_paths(paths.reshape(B * num, T), lengths.repeat_interleave(num), blank=C - 1)
    return path_lp, ids, id_len


class LlmReward(Objective):
    """REINFORCE with the LLM log-likelihood as reward (docs/objectives.md)."""

    tp_collective = True

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        settings: SearchSettings,
        source: str,
        num_samples: int,
        baseline: str,
        error_weight: float,
        every_n_steps: int = 1,
    ):
        super().__init__(name, weight, warmup_steps, every_n_steps=every_n_steps)
        self.settings = settings
        self.source = source
        self.num_samples = num_samples
        self.baseline = baseline
        self.error_weight = error_weight
        self.generator = None  # an optional torch.Generator for the path samples (tests)

    def rewards(self, ctx: StepContext, texts: List[List[str]], llm: Tensor) -> Tensor:
        """r [B, S] = LLM score - β·(word errors / reference words)."""
        if self.error_weight == 0.0:
            return llm
        errors, ref_words = word_errors(texts, transcripts(ctx))  # [B, S], [B]
        return llm - self.error_weight * (errors / ref_words.clamp(min=1)[:, None]).to(llm)

    def samples(self, ctx: StepContext) -> Tuple[Tensor, Tensor, List[List[str]], Tensor]:
        """(score-function log-probs [B, S] with grad, valid [B, S], texts [B][S], LLM scores [B, S])."""
        if self.source == "nbest":
            hyps = hypotheses(ctx, self.settings)
            logp = hyps.acoustic.masked_fill(~hyps.valid, float("-inf")).log_softmax(1)  # log P_n [B, N]
            return logp.masked_fill(~hyps.valid, 0.0), hyps.valid, hyps.texts, hyps.llm.to(logp)
        B, S = ctx.log_probs.shape[0], self.num_samples
        path_lp, ids, id_len = sample_paths(ctx.log_probs, ctx.encoded_len, S, self.generator)
        tok = ctx.env.tokenizer
        flat = [tok.ids_to_text(row[:n]) for row, n in zip(ids.tolist(), id_len.tolist())]
        llm = llm_log_likelihood(ctx.env.llm(), flat, self.settings.llm_length_normalize)
        texts = [flat[b * S : (b + 1) * S] for b in range(B)]
        valid = torch.ones(B, S, dtype=torch.bool, device=path_lp.device)
        return path_lp, valid, texts, llm.view(B, S).to(path_lp)

    def forward(self, ctx: StepContext) -> Tuple[Optional[Tensor], Stats]:
        logp, valid, texts, llm = self.samples(ctx)  # [B, S] each
        B = logp.shape[0]
        r = self.rewards(ctx, texts, llm) if B else llm  # [B, S]
        sampled = self.source == "sample"  # leave-one-out keeps the sampled estimator unbiased
        adv = (r - baseline_of(r, valid, self.baseline, leave_one_out=sampled)) * valid  # [B, S]
        if self.source == "nbest":
            weight = logp.detach().exp() * valid  # P_n
            value = -(weight * r).sum() / max(B, 1)
            surrogate = -(weight * adv * logp).sum() / max(B, 1)
        else:
            value = -(r * valid).sum() / valid.sum().clamp(min=1)
            surrogate = -(adv * logp).sum() / valid.sum().clamp(min=1)
        loss = value.detach() + surrogate - surrogate.detach()
        stats: Stats = {}
        if B:
            stats = {"reward": -value.detach(), "llm": (llm * valid).sum() / valid.sum().clamp(min=1)}
        return loss, stats


@dataclass
class LlmRewardConfig(NBestConfig):
    """λ of CTC - λ·LLM is the block's ``weight``; ``nbest``/``beam_size`` apply to ``source: nbest``."""

    llm_length_normalize: bool = True  # the reward is the LLM log-likelihood per LLM token
    source: str = "sample"  # one of SOURCES
    num_samples: int = 4  # S, paths drawn per utterance (source: sample)
    baseline: str = "utterance_mean"  # one of BASELINES
    error_weight: float = 0.0  # β of the word-error term of the reward

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        source = check_choice(self.source, f"{key}.source", SOURCES)
        num = check_int(self.num_samples, f"{key}.num_samples", 1, MAX_NBEST)
        baseline = check_choice(self.baseline, f"{key}.baseline", BASELINES)
        if source == "sample" and baseline == "utterance_mean" and num < 2:
            raise ConfigError(f"{key}.baseline 'utterance_mean' needs num_samples >= 2 (leave-one-out), got {num}")
        check_number(self.error_weight, f"{key}.error_weight", 0.0, 100.0)


@register_objective("llm_reward", LlmRewardConfig)
def build_llm_reward(cfg: LlmRewardConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    require_llm(env, key)
    return [
        LlmReward(
            "llm_reward",
            settings=SearchSettings.read(cfg, key),
            source=cfg.source,
            num_samples=cfg.num_samples,
            baseline=cfg.baseline,
            error_weight=float(cfg.error_weight),
            **cfg.schedule(),
        )
    ]
