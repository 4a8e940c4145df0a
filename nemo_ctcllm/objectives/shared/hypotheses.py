"""What the hypothesis-side objectives share (``llm_rescoring``, ``llm_reward``, ``llm_pseudo_label``).

The LLM judges what the CTC model outputs: per utterance the N best label sequences of the final CTC head
(:func:`nemo_ctcllm.decoding.ctc_prefix_beam_search`, no grad), their acoustic log-probabilities
a_n = log p_CTC(y_n | x) = -CTC(y_n) (differentiable: torch's CTC loss on the N hypotheses), and the frozen
LLM's log-likelihood of their text l_n = log p_LLM(text_n + EOS | BOS) (summed over the LLM's tokens, or
divided by their number), with text_n = the ASR tokenizer's ``ids_to_text`` of y_n (the vocabularies differ,
so text crosses over). EOS is scored so that an empty or truncated hypothesis is not favoured.

Combined score and posterior over the N-best (shallow-fusion style):  s_n = κ·a_n + λ·l_n,
P_n = softmax_n(s_n). Only a_n carries gradient; the LLM is never differentiated.

Tensor parallelism: every rank of the LLM's TP group must feed it identical inputs, so the hypothesis texts
are gathered over the group, scored by every rank, and each keeps its own rows (:func:`llm_log_likelihood`).
The N-best and its LLM scores are computed once per step and shared by every objective that asks for the
same settings (``StepContext.cache``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from kaldialign import edit_distance
from torch import Tensor

from nemo_ctcllm.config import check_bool, check_int, check_number
from nemo_ctcllm.decoding.llm_rerank import llm_log_likelihood
from nemo_ctcllm.decoding.nbest import ctc_prefix_beam_search, sequence_log_probs
from nemo_ctcllm.objectives.base import ObjectiveConfig, ObjectiveEnv, StepContext

MAX_NBEST = 64


@dataclass
class NBestConfig(ObjectiveConfig):
    """Keys of the N-best search and its LLM scores, shared by the hypothesis-side objectives' blocks."""

    nbest: int = 8  # hypotheses per utterance
    beam_size: Optional[int] = None  # prefix beam width (>= nbest); null = nbest
    llm_length_normalize: bool = False  # l per LLM token instead of summed

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        SearchSettings.read(self, key)


@dataclass
class SearchConfig(NBestConfig):
    """:class:`NBestConfig` plus the weights of the combined score s = κ·a + λ·l."""

    lm_weight: float = 0.5  # λ
    acoustic_scale: float = 1.0  # κ


@dataclass(frozen=True)
class SearchSettings:
    nbest: int
    beam_size: int
    lm_weight: float
    acoustic_scale: float
    llm_length_normalize: bool

    @classmethod
    def read(cls, block, key: str) -> "SearchSettings":
        """Validate a block's search keys (a block without ``lm_weight``/``acoustic_scale`` gets 0 / 1)."""
        lm_weight, acoustic_scale = getattr(block, "lm_weight", 0.0), getattr(block, "acoustic_scale", 1.0)
        nbest = check_int(block.nbest, f"{key}.nbest", 1, MAX_NBEST)
        beam = block.beam_size
        beam = nbest if beam is None else check_int(beam, f"{key}.beam_size", nbest, 4 * MAX_NBEST)
        return cls(
            nbest=nbest,
            beam_size=beam,
            lm_weight=check_number(lm_weight, f"{key}.lm_weight", 0.0, 100.0),
            acoustic_scale=check_number(acoustic_scale, f"{key}.acoustic_scale", 0.0, 100.0, low_open=True),
            llm_length_normalize=check_bool(block.llm_length_normalize, f"{key}.llm_length_normalize"),
        )




@dataclass
class Hypotheses:
    """N-best of a batch. ids [B, N, L], lengths [B, N], valid [B, N] bool, texts [B][N] ('' if not valid),
    acoustic [B, N] log p_CTC(y | x) with grad (0 where not valid), llm [B, N] fp32 no grad (0 where not valid)."""

    ids: Tensor
    lengths: Tensor
    valid: Tensor
    texts: List[List[str]]
    acoustic: Tensor
    llm: Tensor

    def combined(self, s: SearchSettings) -> Tensor:
        """s_n = κ·a_n + λ·l_n [B, N], -inf where not valid (grad through a_n)."""
        score = s.acoustic_scale * self.acoustic + s.lm_weight * self.llm.to(self.acoustic)
        return score.masked_fill(~self.valid, float("-inf"))

    def posterior(self, s: SearchSettings) -> Tensor:
        """P_n = softmax over the valid N-best of the combined score [B, N] (0 where not valid)."""
        return self.combined(s).softmax(-1).nan_to_num(0.0)


def hypotheses(ctx: StepContext, s: SearchSettings) -> Hypotheses:
    """The N-best of ``ctx.log_probs`` with acoustic and LLM scores (computed once per step and settings)."""
    key = ("hypotheses", s.nbest, s.beam_size, s.llm_length_normalize)
    if key not in ctx.cache:
        lp, lengths = ctx.log_probs, ctx.encoded_len  # [B, T, V+1], [B]
        B = lp.shape[0]
        nb = ctc_prefix_beam_search(lp.detach(), lengths, s.beam_size, s.nbest)  # ids [B, N, L]
        valid = nb.valid  # [B, N]
        tok = ctx.env.tokenizer
        ids, lens = nb.ids.tolist(), nb.lengths.tolist()
        texts = [[tok.ids_to_text(ids[b][n][: lens[b][n]]) if valid[b, n] else "" for n in range(s.nbest)]
                 for b in range(B)]
        acoustic = sequence_log_probs(lp, lengths, nb.ids, nb.lengths) if B else lp.new_zeros(0, s.nbest)
        acoustic = torch.where(valid, acoustic, 0.0)  # [B, N]
        llm = llm_log_likelihood(ctx.env.llm(), [t for row in texts for t in row], s.llm_length_normalize)
        llm = llm.view(B, s.nbest).to(lp.device).masked_fill(~valid, 0.0)  # [B, N]
        ctx.cache[key] = Hypotheses(nb.ids, nb.lengths, valid, texts, acoustic, llm)
    return ctx.cache[key]


def word_errors(hyp_texts: Sequence[Sequence[str]], refs: Sequence[str]) -> Tuple[Tensor, Tensor]:
    """Word edit distance of each hypothesis to its reference [B, N] and reference word counts [B] (float)."""
    n = len(hyp_texts[0]) if len(hyp_texts) else 0
    errors = torch.tensor([[float(edit_distance(r.split(), h.split())["total"]) for h in row]
                           for row, r in zip(hyp_texts, refs)]).view(len(refs), n)
    return errors, torch.tensor([float(len(r.split())) for r in refs])


def top_choices(hyps: Hypotheses, settings: SearchSettings) -> Tuple[Tensor, Tensor]:
    """Indices [B] of the acoustic best and of the LLM-rescored best hypothesis."""
    acoustic = hyps.acoustic.detach().masked_fill(~hyps.valid, float("-inf"))
    return acoustic.argmax(1), hyps.combined(settings).detach().argmax(1)
