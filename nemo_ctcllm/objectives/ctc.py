"""CTC terms: the final head (``ctc_final``) and intermediate heads (``interctc``).

Self-conditioned CTC (Nozaki & Komatsu 2021, arXiv 2104.02724): the posteriors of the head at block k are
projected back to the model width and added to that block's output, so block k+1 sees what block k
already recognised:  x_k <- x_k + Linear_{V+1 -> D}(softmax(head_k(x_k))).  This changes the encoder's
forward pass, so these heads are kept at export. It is installed as a forward hook on the encoder block;
layer outputs are otherwise captured through NeMo's ``AccessMixin`` (the encoder's own InterCTC capture).

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from nemo.collections.asr.modules import ConvASRDecoder
from nemo.core.classes.mixins import AccessMixin

from nemo_ctcllm.config import check_bool
from nemo_ctcllm.objectives.base import (
    Hook,
    Objective,
    ObjectiveConfig,
    ObjectiveEnv,
    Stats,
    StepContext,
    register_objective,
)
from nemo_ctcllm.objectives.shared.checks import check_block_weights, check_blocks, encoder_depth


def ctc_loss_and_stats(ctx: StepContext, log_probs: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """CTC loss of ``log_probs`` [B, T, V+1] against the batch's transcripts, with WER stats when asked.

    Uses the model's own NeMo ``CTCLoss`` and ``WER`` metric (``ctx.env``), so every head is measured the same way.
    """
    env = ctx.env
    loss = env.ctc_loss(log_probs=log_probs, targets=ctx.targets, input_lengths=lengths, target_lengths=ctx.target_len)
    # NeMo's CTCLoss has zero_infinity=True: an infeasible utterance (more labels + repeats than frames)
    # adds 0 instead of inf. Count them, so that a tokenizer/subsampling mismatch shows up in the logs.
    stats: Stats = {"infeasible": ctc_infeasible(ctx.targets, ctx.target_len, lengths).sum().float()}
    if ctx.compute_wer:
        wer, num, denom = env.ctc_wer(log_probs, lengths, ctx.targets, ctx.target_len)
        stats.update(wer=wer, wer_num=num, wer_denom=denom)
    return loss, stats


def ctc_infeasible(targets: torch.Tensor, target_len: torch.Tensor, input_len: torch.Tensor) -> torch.Tensor:
    """Which utterances CTC cannot align: targets [B, U], target_len [B], input_len [B] -> bool [B].

    A CTC path needs one frame per label plus one blank between equal neighbours.
    """
    U = targets.shape[1]
    valid = torch.arange(U - 1, device=targets.device)[None, :] < (target_len[:, None] - 1)  # [B, U-1]
    repeats = ((targets[:, 1:] == targets[:, :-1]) & valid).sum(1)  # [B]
    return target_len + repeats > input_len


class FinalCTC(Objective):
    """The model's own CTC loss on the final encoder output (NeMo's loss, unchanged)."""

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:
        return ctc_loss_and_stats(ctx, ctx.log_probs, ctx.encoded_len)


@register_objective("ctc_final", ObjectiveConfig)
def build_ctc_final(cfg: ObjectiveConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    return [FinalCTC("ctc_final", **cfg.schedule())]


class InterCTCHead(Objective):
    """CTC on the output of encoder block ``block`` (1-based).

    Args:
        decoder: a separate CTC head, or None to share the model's final decoder (``env.final_head``).
        selfcond: Linear(V+1 -> D) for self-conditioning, or None.
    """

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        block: int,
        decoder: Optional[torch.nn.Module],
        selfcond,
        every_n_steps: int = 1,
    ):
        super().__init__(name, weight, warmup_steps, capture_blocks=[block], every_n_steps=every_n_steps)
        self.block = block
        self.decoder = decoder
        self.selfcond = selfcond
        self.needed_at_inference = selfcond is not None
        self._stash: Optional[torch.Tensor] = None  # log-probs computed inside the encoder this step

    def head(self, env: ObjectiveEnv, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, T] (after the encoder's out_proj, if any) -> log-probs [B, T, V+1]."""
        return (self.decoder if self.decoder is not None else env.final_head)(encoder_output=x)

    def ctc_heads(self, env: ObjectiveEnv) -> Dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        return {self.block: lambda x: self.head(env, x)}

    def encoder_hooks(self, env: ObjectiveEnv) -> Dict[int, Hook]:
        """Self-conditioning: add the conditioning to block ``self.block``'s output on every forward (train and
        inference); while the model captures blocks, keep the head's log-probs for :meth:`pop_stash`."""
        if self.selfcond is None:
            return {}

        def hook(_module, _args, output):
            if isinstance(output, tuple):
                raise RuntimeError("self-conditioned InterCTC does not support cache-aware streaming encoders")
            x = output  # [B, T, D]
            if env.encoder.out_proj is not None:
                x = env.encoder.out_proj(x)
            log_probs = self.head(env, x.transpose(1, 2))  # [B, T, V+1]
            if AccessMixin.is_access_enabled(env.model_guid):
                self._stash = log_probs
            return output + self.selfcond(log_probs.exp())  # [B, T, D]

        return {self.block: hook}

    def pop_stash(self) -> Dict[int, torch.Tensor]:
        stash, self._stash = self._stash, None
        return {} if stash is None else {self.block: stash}

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:
        log_probs, length = ctx.head_log_probs(self.block)  # [B, T, V+1], [B]
        return ctc_loss_and_stats(ctx, log_probs, length)


@dataclass
class InterCTCConfig(ObjectiveConfig):
    blocks: List[int] = field(default_factory=list)  # encoder blocks with a head (1-based, not the last)
    weights: List[float] = field(default_factory=list)  # one weight in [0, 1] per block
    shared_decoder: bool = False  # share the final CTC decoder (NeMo's InterCTC) instead of a head per block
    self_conditioning: bool = False  # feed each head's posteriors back into the encoder (kept at export)

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_blocks(self.blocks, encoder_depth(env, key), f"{key}.blocks", allow_last=False)
        check_block_weights(self.weights, self.blocks, f"{key}.weights")
        check_bool(self.shared_decoder, f"{key}.shared_decoder")
        check_bool(self.self_conditioning, f"{key}.self_conditioning")


@register_objective("interctc", InterCTCConfig)
def build_interctc(cfg: InterCTCConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    """One term ``interctc_l{k}`` per block k, weighted ``weight * weights[i]``."""
    V = env.vocab_size  # ASR pieces; the heads have V+1 classes (blank last)
    terms: List[Objective] = []
    for k, w in zip(cfg.blocks, cfg.weights):
        decoder = None
        if not cfg.shared_decoder:
            decoder = ConvASRDecoder(feat_in=env.encoded_width, num_classes=V, vocabulary=list(env.vocabulary))
        selfcond = torch.nn.Linear(V + 1, env.encoder.d_model) if cfg.self_conditioning else None
        terms.append(
            InterCTCHead(
                f"interctc_l{k}",
                cfg.weight * w,
                cfg.warmup_steps,
                k,
                decoder,
                selfcond,
                every_n_steps=cfg.every_n_steps,
            )
        )
    return terms
