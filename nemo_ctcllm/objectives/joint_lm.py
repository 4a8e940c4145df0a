"""A jointly trained LM head on the encoder output (``joint_lm``): an attention decoder, not a teacher.

A small transformer decoder reads the encoder output and predicts the transcript autoregressively over the
ASR BPE vocabulary (teacher forcing): causal self-attention over the previous tokens, cross-attention to the
encoder output [B, T, D] with its padding mask. It is trained jointly with the encoder, so its gradient
reaches the encoder through the cross-attention (the hybrid CTC/attention set-up of Watanabe et al. 2017,
used here only as a training signal: the head is dropped at export and the model stays a CTC model).

Ids: the V ASR pieces keep their ids 0..V-1; BOS = V and EOS = V+1 are two extra ids (one table of V+2 rows
for the input embedding, V+2 output classes). For a transcript y_1..y_U:

    input  x = BOS, y_1, ..., y_U
    labels l = y_1, ..., y_U, EOS
    loss = - sum_{b, i <= U_b} log p(l_{b,i} | l_{b,<i}, encoder output_b) / sum_b (U_b + 1)

(token-level mean; positions past U_b + 1 are padding and ignored). Positions are sinusoidal, so there is no
maximum transcript length. The decoder width is the encoder output width D, so ``heads`` must divide D.
Cost: the decoder runs on U + 1 tokens with cross-attention over T frames; no extra encoder pass.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from nemo_ctcllm.objectives.base import ConfigError, Objective, StepContext, Stats, check_int, check_number, register_objective
from nemo_ctcllm.objectives.common import length_mask, masked_mean


def sinusoid_positions(length: int, width: int, device) -> torch.Tensor:
    """The transformer's sinusoidal position table [length, width]."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # [L, 1]
    freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return table


class JointLM(Objective):
    """Token cross entropy of a transformer decoder that attends to the encoder output (module docstring)."""

    def __init__(self, name: str, weight: float, warmup_steps: int, width: int, vocab_size: int, block: DictConfig):
        super().__init__(name, weight, warmup_steps)
        self.vocab_size = vocab_size
        self.bos_id = vocab_size
        self.eos_id = vocab_size + 1
        self.width = width
        self.embed = torch.nn.Embedding(vocab_size + 2, width)
        layer = torch.nn.TransformerDecoderLayer(
            d_model=width, nhead=block.heads, dim_feedforward=block.ffn_mult * width, dropout=block.dropout,
            batch_first=True, norm_first=True,
        )
        self.decoder = torch.nn.TransformerDecoder(layer, num_layers=block.layers, norm=torch.nn.LayerNorm(width))
        self.out = torch.nn.Linear(width, vocab_size + 2)

    def teacher_forcing(self, targets: torch.Tensor, target_len: torch.Tensor):
        """targets [B, U], target_len [B] -> inputs [B, U+1], labels [B, U+1], label mask [B, U+1]."""
        B, U = targets.shape
        tokens = targets.masked_fill(~length_mask(target_len, U), 0)  # [B, U], padding -> any valid id
        inputs = torch.cat([tokens.new_full((B, 1), self.bos_id), tokens], dim=1)  # [B, U+1]
        labels = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)  # [B, U+1]
        labels = labels.scatter(1, target_len[:, None].long(), self.eos_id)  # EOS right after the last token
        return inputs, labels, length_mask(target_len + 1, U + 1)

    def token_nll(
        self, encoded: torch.Tensor, encoded_len: torch.Tensor, targets: torch.Tensor, target_len: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token negative log-likelihood.

        encoded [B, D, T], encoded_len [B], targets [B, U], target_len [B]
        -> nll [B, U+1] (0 on padding), mask [B, U+1] (True on scored positions), correct [B, U+1] (argmax hit)
        """
        inputs, labels, mask = self.teacher_forcing(targets, target_len)  # [B, L] each, L = U+1
        L = inputs.shape[1]
        x = self.embed(inputs) * math.sqrt(self.width) + sinusoid_positions(L, self.width, inputs.device)  # [B, L, D]
        memory = encoded.transpose(1, 2)  # [B, T, D]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=1)  # True = masked
        h = self.decoder(
            x, memory, tgt_mask=causal, tgt_key_padding_mask=~mask,
            memory_key_padding_mask=~length_mask(encoded_len, memory.shape[1]), tgt_is_causal=True,
        )  # [B, L, D]
        logits = self.out(h)  # [B, L, V+2]
        nll = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, -100), reduction="none")  # [B, L]
        correct = (logits.argmax(-1) == labels) & mask
        return nll, mask, correct

    def utterance_losses(self, ctx: StepContext) -> torch.Tensor:
        """Mean token NLL of each utterance [B] (what padding must not change)."""
        nll, mask, _ = self.token_nll(ctx.encoded, ctx.encoded_len, ctx.targets, ctx.target_len)
        return masked_mean(nll, mask, dim=1)

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:
        nll, mask, correct = self.token_nll(ctx.encoded, ctx.encoded_len, ctx.targets, ctx.target_len)
        loss = masked_mean(nll, mask, dim=(0, 1))  # token-level mean over the batch
        acc = correct.sum() / mask.sum().clamp(min=1)
        return loss, {"acc": acc.detach().float()}


DEFAULTS = {"layers": 1, "heads": 2, "ffn_mult": 4, "dropout": 0.0}


@register_objective("joint_lm", defaults=DEFAULTS)
def build_joint_lm(block: DictConfig, model, key: str) -> List[Objective]:
    width = model.decoder._feat_in  # encoder output width (d_model or its out_proj)
    check_int(block.layers, f"{key}.layers", 1)
    check_int(block.heads, f"{key}.heads", 1)
    if width % block.heads:
        divisors = [h for h in range(1, width + 1) if width % h == 0]
        raise ConfigError(
            f"{key}.heads must divide the encoder output width {width}; allowed: {divisors}, got {block.heads}"
        )
    check_int(block.ffn_mult, f"{key}.ffn_mult", 1)
    check_number(block.dropout, f"{key}.dropout", 0.0, 1.0, high_open=True)
    vocab_size = model.decoder.num_classes_with_blank - 1  # ASR pieces, without the CTC blank
    return [JointLM("joint_lm", block.weight, block.warmup_steps, width, vocab_size, block)]
