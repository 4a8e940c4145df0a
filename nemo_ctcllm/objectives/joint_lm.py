"""A jointly trained LM head on the encoder output (``joint_lm``): an attention decoder, not a teacher.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F

from nemo_ctcllm.config import ConfigError, check_int, check_number
from nemo_ctcllm.objectives.base import Objective, ObjectiveConfig, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.tensors import length_mask


def sinusoid_positions(length: int, width: int, device) -> torch.Tensor:
    """The transformer's sinusoidal position table [length, width]."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # [L, 1]
    freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return table


class JointLM(Objective):
    """Token cross entropy of a transformer decoder that attends to the encoder output (docs/objectives.md)."""

    def __init__(
        self,
        name: str,
        weight: float,
        warmup_steps: int,
        width: int,
        vocab_size: int,
        block: "JointLMConfig",
        every_n_steps: int = 1,
    ):
        super().__init__(name, weight, warmup_steps, every_n_steps=every_n_steps)
        self.vocab_size = vocab_size
        self.bos_id = vocab_size
        self.eos_id = vocab_size + 1
        self.width = width
        self.embed = torch.nn.Embedding(vocab_size + 2, width)
        # N(0, 1/width): the scaled embedding (x sqrt(width)) has unit variance per element, like the positions.
        # At torch's N(0, 1) the token stream (norm ~ width per token) drowned the cross-attention's output and
        # the encoder got 1e-4 of CTC's gradient: the head trained a text-only LM (docs/objectives.md).
        torch.nn.init.normal_(self.embed.weight, 0.0, width**-0.5)
        layer = torch.nn.TransformerDecoderLayer(
            d_model=width,
            nhead=block.heads,
            dim_feedforward=block.ffn_mult * width,
            dropout=block.dropout,
            batch_first=True,
            norm_first=True,
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
            x,
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=~mask,
            memory_key_padding_mask=~length_mask(encoded_len, memory.shape[1]),
            tgt_is_causal=True,
        )  # [B, L, D]
        logits = self.out(h)  # [B, L, V+2]
        nll = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, -100), reduction="none")  # [B, L]
        correct = (logits.argmax(-1) == labels) & mask
        return nll, mask, correct

    def utterance_losses(self, ctx: StepContext) -> torch.Tensor:
        """Summed token NLL of each utterance [B] (what padding must not change)."""
        nll, _, _ = self.token_nll(ctx.encoded, ctx.encoded_len, ctx.targets, ctx.target_len)
        return nll.sum(dim=1)  # [B]; nll is 0 on padding

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:
        nll, mask, correct = self.token_nll(ctx.encoded, ctx.encoded_len, ctx.targets, ctx.target_len)
        loss = nll.sum(dim=1).mean()  # per-utterance sum, batch mean: the scale of CTC's mean_batch
        acc = correct.sum() / mask.sum().clamp(min=1)
        return loss, {"acc": acc.detach().float(), "token_nll": (nll.sum() / mask.sum().clamp(min=1)).detach()}


@dataclass
class JointLMConfig(ObjectiveConfig):
    layers: int = 1  # transformer decoder layers
    heads: int = 2  # attention heads; must divide the encoder output width
    ffn_mult: int = 4  # feed-forward width = ffn_mult * width
    dropout: float = 0.0

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        width = env.encoded_width
        check_int(self.layers, f"{key}.layers", 1)
        check_int(self.heads, f"{key}.heads", 1)
        if width % self.heads:
            divisors = [h for h in range(1, width + 1) if width % h == 0]
            raise ConfigError(
                f"{key}.heads must divide the encoder output width {width}; allowed: {divisors}, got {self.heads}"
            )
        check_int(self.ffn_mult, f"{key}.ffn_mult", 1)
        check_number(self.dropout, f"{key}.dropout", 0.0, 1.0, high_open=True)


@register_objective("joint_lm", JointLMConfig)
def build_joint_lm(cfg: JointLMConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    return [JointLM("joint_lm", width=env.encoded_width, vocab_size=env.vocab_size, block=cfg, **cfg.schedule())]
