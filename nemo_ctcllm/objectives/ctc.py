"""CTC terms: the final head (``ctc_final``) and intermediate heads (``interctc``).

Intermediate CTC (Lee & Watanabe 2021, arXiv 2102.03216) adds a CTC loss on the output of chosen
encoder blocks: Total = a_final * CTC_final + sum_k a_k * CTC_k. Heads are either separate per block
(default: a fresh ``ConvASRDecoder`` each) or shared with the final decoder (NeMo's InterCTC semantics).

Self-conditioned CTC (Nozaki & Komatsu 2021, arXiv 2104.02724): the posteriors of the head at block k are
projected back to the model width and added to that block's output, so block k+1 sees what block k
already recognised:  x_k <- x_k + Linear_{V+1 -> D}(softmax(head_k(x_k))).  This changes the encoder's
forward pass, so these heads are kept at export. It is installed as a forward hook on the encoder block;
layer outputs are otherwise captured through NeMo's ``AccessMixin`` (the encoder's own InterCTC capture).

Blocks are numbered from 1: block k is the output after the k-th Conformer block (ESPnet's convention;
NeMo's ``apply_at_layers`` is the 0-based k-1).
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
from nemo.collections.asr.modules import ConvASRDecoder
from nemo.core.classes.mixins import AccessMixin
from omegaconf import DictConfig

from nemo_ctcllm.objectives.base import ConfigError, Objective, StepContext, Stats, check_weight, register_objective


def ctc_loss_and_stats(
    ctx: StepContext, log_probs: torch.Tensor, lengths: torch.Tensor
) -> Tuple[torch.Tensor, Stats]:
    """CTC loss of ``log_probs`` [B, T, V+1] against the batch's transcripts, with WER stats when asked.

    Uses the model's own NeMo ``CTCLoss`` and ``WER`` metric, so every head is measured the same way.
    """
    model = ctx.model
    loss = model.loss(log_probs=log_probs, targets=ctx.targets, input_lengths=lengths, target_lengths=ctx.target_len)
    # NeMo's CTCLoss has zero_infinity=True: an infeasible utterance (more labels + repeats than frames)
    # adds 0 instead of inf. Count them, so that a tokenizer/subsampling mismatch shows up in the logs.
    stats: Stats = {"infeasible": ctc_infeasible(ctx.targets, ctx.target_len, lengths).sum().float()}
    if ctx.compute_wer:
        model.wer.update(
            predictions=log_probs, predictions_lengths=lengths, targets=ctx.targets, targets_lengths=ctx.target_len
        )
        wer, num, denom = model.wer.compute()
        model.wer.reset()
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


@register_objective("ctc_final", defaults={})
def build_ctc_final(block: DictConfig, model, key: str) -> List[Objective]:
    return [FinalCTC("ctc_final", block.weight, block.warmup_steps)]


class InterCTCHead(Objective):
    """CTC on the output of encoder block ``block`` (1-based).

    Args:
        decoder: a separate CTC head, or None to share the model's final decoder.
        selfcond: Linear(V+1 -> D) for self-conditioning, or None.
    """

    def __init__(self, name, weight, warmup_steps, block: int, decoder: Optional[torch.nn.Module], selfcond):
        super().__init__(name, weight, warmup_steps, capture_blocks=[block])
        self.block = block
        self.decoder = decoder
        self.selfcond = selfcond
        self.needed_at_inference = selfcond is not None
        self._stash: Optional[torch.Tensor] = None  # log-probs computed inside the encoder this step

    def head(self, model, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, T] (after the encoder's out_proj, if any) -> log-probs [B, T, V+1]."""
        return (self.decoder if self.decoder is not None else model.decoder)(encoder_output=x)

    def install_selfcond_hook(self, model) -> None:
        """Add the conditioning to block ``self.block``'s output on every forward (train and inference)."""
        model_ref = weakref.ref(model)

        def hook(_module, _args, output):
            if isinstance(output, tuple):
                raise RuntimeError("self-conditioned InterCTC does not support cache-aware streaming encoders")
            m = model_ref()
            x = output  # [B, T, D]
            if m.encoder.out_proj is not None:
                x = m.encoder.out_proj(x)
            log_probs = self.head(m, x.transpose(1, 2))  # [B, T, V+1]
            if AccessMixin.is_access_enabled(getattr(m, "model_guid", None)):
                self._stash = log_probs
            return output + self.selfcond(log_probs.exp())  # [B, T, D]

        model.encoder.layers[self.block - 1].register_forward_hook(hook)

    def pop_stash(self) -> Optional[torch.Tensor]:
        stash, self._stash = self._stash, None
        return stash

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:
        output, length = ctx.layers[self.block]  # [B, D, T], [B]
        log_probs = ctx.selfcond_log_probs.get(self.block)
        if log_probs is None:
            log_probs = self.head(ctx.model, output)  # [B, T, V+1]
        return ctc_loss_and_stats(ctx, log_probs, length)


def encoder_depth(model, key: str) -> int:
    layers = getattr(model.encoder, "layers", None)
    if layers is None:
        raise ConfigError(f"{key}: the encoder {type(model.encoder).__name__} has no `layers` to attach heads to")
    return len(layers)


def check_blocks(blocks, depth: int, key: str, allow_last: bool) -> List[int]:
    """Blocks are distinct integers in [1, depth-1] (or [1, depth] when the last block is allowed)."""
    top = depth if allow_last else depth - 1
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ConfigError(f"{key} must be a non-empty list of encoder blocks in [1, {top}], got {blocks!r}")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= top:
            raise ConfigError(
                f"{key}: block {b!r} is outside the encoder; allowed: integers in [1, {top}] "
                f"(the encoder has {depth} blocks{'' if allow_last else '; the last one is the final CTC head'})"
            )
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{key}: blocks must be distinct, got {list(blocks)}")
    return list(blocks)


def check_block_weights(weights, blocks: List[int], key: str) -> List[float]:
    """One weight in [0, 1] per block."""
    weights = list(weights)
    if len(weights) != len(blocks):
        raise ConfigError(f"{key} must have one weight per block: {len(blocks)} blocks, {len(weights)} weights")
    return [check_weight(w, f"{key}[{i}]", upper=1.0) for i, w in enumerate(weights)]


@register_objective(
    "interctc",
    defaults={"blocks": [], "weights": [], "shared_decoder": False, "self_conditioning": False},
)
def build_interctc(block: DictConfig, model, key: str) -> List[Objective]:
    """One term ``interctc_l{k}`` per block k, weighted ``weight * weights[i]``."""
    depth = encoder_depth(model, key)
    blocks = check_blocks(list(block.blocks), depth, f"{key}.blocks", allow_last=False)
    weights = check_block_weights(block.weights, blocks, f"{key}.weights")
    dec_cfg = model.cfg.decoder
    feat_in = model.decoder._feat_in  # width the final head reads (encoder d_model or its out_proj)
    num_classes = model.decoder.num_classes_with_blank - 1
    terms: List[Objective] = []
    for k, w in zip(blocks, weights):
        decoder = None
        if not block.shared_decoder:
            decoder = ConvASRDecoder(feat_in=feat_in, num_classes=num_classes, vocabulary=list(dec_cfg.vocabulary))
        selfcond = torch.nn.Linear(num_classes + 1, model.encoder.d_model) if block.self_conditioning else None
        term = InterCTCHead(f"interctc_l{k}", block.weight * w, block.warmup_steps, k, decoder, selfcond)
        if selfcond is not None:
            term.install_selfcond_hook(model)
        terms.append(term)
    return terms
