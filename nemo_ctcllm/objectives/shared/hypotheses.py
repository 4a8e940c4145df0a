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

Source pass: by default the N-best is searched in the training pass itself (``ctx.log_probs``: SpecAugment,
dither and dropout on while training). ``source="clean"`` searches it in a second, un-augmented pass of the
same batch (the model's preprocessor, encoder and final head in eval mode: no SpecAugment, no dither, no
dropout, BatchNorm on its running statistics; no gradient), as a teacher's view should be (noisy student, Xie
et al. 2020, arXiv 1911.04252; Park et al. 2020, arXiv 2005.09629: labels from the un-augmented input, the
student trained on the augmented one). ``Hypotheses.teacher`` holds the acoustic scores of the pass the N-best
came from (no grad), ``Hypotheses.acoustic`` those of the training pass (with grad); equal in eval mode.
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
from nemo_ctcllm.objectives.shared.passes import access_disabled, eval_mode

MAX_NBEST = 64
SOURCES = ("train", "clean")  # the pass the N-best is searched in (see the module docstring)


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
    acoustic [B, N] log p_CTC(y | x) of the training pass with grad (0 where not valid), teacher [B, N] the same
    under the pass the N-best was searched in, no grad, llm [B, N] fp32 no grad (0 where not valid, and
    everywhere when the LLM was not asked for)."""

    ids: Tensor
    lengths: Tensor
    valid: Tensor
    texts: List[List[str]]
    acoustic: Tensor
    llm: Tensor
    teacher: Tensor

    def combined(self, s: SearchSettings) -> Tensor:
        """s_n = κ·a_n + λ·l_n [B, N], -inf where not valid (grad through a_n)."""
        score = s.acoustic_scale * self.acoustic + s.lm_weight * self.llm.to(self.acoustic)
        return score.masked_fill(~self.valid, float("-inf"))

    def posterior(self, s: SearchSettings) -> Tensor:
        """P_n = softmax over the valid N-best of the combined score [B, N] (0 where not valid)."""
        return self.combined(s).softmax(-1).nan_to_num(0.0)

    def teacher_combined(self, s: SearchSettings, lm_weight: float) -> Tensor:
        """κ·teacher_n + lm_weight·l_n [B, N] (no grad), -inf where not valid: the score that ranks pseudo-labels."""
        score = s.acoustic_scale * self.teacher + lm_weight * self.llm.to(self.teacher)
        return score.masked_fill(~self.valid, float("-inf"))


def clean_log_probs(ctx: StepContext) -> Tensor:
    """Final-head log-probs [B, T, V+1] of an un-augmented pass over ``ctx.signal``, no grad (cached per step).

    In eval mode the training pass is already un-augmented and is reused. Otherwise the preprocessor, encoder
    and final head run once more in eval mode (no SpecAugment -- it is not called --, dither or dropout;
    BatchNorm on its running statistics, which a no-grad pass in train mode would update, and which include
    this step's training pass) with the AccessMixin capture off, so nothing is registered or stashed for the
    intermediate heads. Its encoded lengths equal the training pass's (augmentation moves no frame).
    """
    if not ctx.training:
        return ctx.log_probs.detach()
    if "clean_log_probs" not in ctx.cache:
        env = ctx.env
        with torch.no_grad(), eval_mode(env.preprocessor, env.encoder, env.final_head), access_disabled(env.model_guid):
            feats, feats_len = env.preprocessor(input_signal=ctx.signal, length=ctx.signal_len)  # [B, F, T']
            encoded, encoded_len = env.encoder(audio_signal=feats, length=feats_len)  # [B, D, T], [B]
            log_probs = env.final_head(encoder_output=encoded)  # [B, T, V+1]
        if not torch.equal(encoded_len.cpu(), ctx.encoded_len.cpu()):
            raise RuntimeError("the un-augmented pass gave other encoded lengths than the training pass")
        ctx.cache["clean_log_probs"] = log_probs
    return ctx.cache["clean_log_probs"]


def hypotheses(ctx: StepContext, s: SearchSettings, source: str = "train", with_llm: bool = True) -> Hypotheses:
    """The N-best of the ``source`` pass with acoustic (training and source pass) and LLM scores (computed
    once per step, settings and source). ``with_llm=False``: no LLM call, ``llm`` is 0 (an acoustic ranker)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    key = ("hypotheses", source, with_llm, s.nbest, s.beam_size, s.llm_length_normalize)
    if key not in ctx.cache:
        lp, lengths = ctx.log_probs, ctx.encoded_len  # [B, T, V+1], [B]
        search_lp = lp.detach() if source == "train" else clean_log_probs(ctx)  # [B, T, V+1]
        B = lp.shape[0]
        nb = ctc_prefix_beam_search(search_lp, lengths, s.beam_size, s.nbest)  # ids [B, N, L]
        valid = nb.valid  # [B, N]
        tok = ctx.env.tokenizer
        ids, lens = nb.ids.tolist(), nb.lengths.tolist()
        texts = [
            [tok.ids_to_text(ids[b][n][: lens[b][n]]) if valid[b, n] else "" for n in range(s.nbest)] for b in range(B)
        ]
        acoustic = sequence_log_probs(lp, lengths, nb.ids, nb.lengths) if B else lp.new_zeros(0, s.nbest)
        acoustic = torch.where(valid, acoustic, 0.0)  # [B, N]
        if source == "train" or not ctx.training or not B:  # searched in the training pass itself
            teacher = acoustic.detach()
        else:
            with torch.no_grad():
                teacher = torch.where(valid, sequence_log_probs(search_lp, lengths, nb.ids, nb.lengths), 0.0)
        if with_llm:
            llm = llm_log_likelihood(ctx.env.llm(), [t for row in texts for t in row], s.llm_length_normalize)
            llm = llm.view(B, s.nbest).to(lp.device).masked_fill(~valid, 0.0)  # [B, N]
        else:
            llm = torch.zeros(B, s.nbest, device=lp.device)
        ctx.cache[key] = Hypotheses(nb.ids, nb.lengths, valid, texts, acoustic, llm, teacher)
    return ctx.cache[key]


def word_errors(hyp_texts: Sequence[Sequence[str]], refs: Sequence[str]) -> Tuple[Tensor, Tensor]:
    """Word edit distance of each hypothesis to its reference [B, N] and reference word counts [B] (float)."""
    n = len(hyp_texts[0]) if len(hyp_texts) else 0
    errors = torch.tensor(
        [[float(edit_distance(r.split(), h.split())["total"]) for h in row] for row, r in zip(hyp_texts, refs)]
    ).view(len(refs), n)
    return errors, torch.tensor([float(len(r.split())) for r in refs])


def top_choices(hyps: Hypotheses, settings: SearchSettings) -> Tuple[Tensor, Tensor]:
    """Indices [B] of the acoustic best and of the LLM-rescored best hypothesis."""
    acoustic = hyps.acoustic.detach().masked_fill(~hyps.valid, float("-inf"))
    return acoustic.argmax(1), hyps.combined(settings).detach().argmax(1)
