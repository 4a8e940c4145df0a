"""``llm_prefix_clm``: the frozen LLM as a linguistic regularizer of the encoder (LAIL, arXiv 2506.22846).

Prompt layout choices: BOS comes first because every LLaMA training sequence starts with it (position 0 is
the attention sink); the transcript follows the prompt/instruction directly. The transcript is the ASR
tokenizer's ``ids_to_text`` of the target ids, re-tokenized with the LLM's tokenizer (with a leading space
when an instruction precedes it, the natural continuation of "Transcribe:"). Only transcript tokens and
EOS are counted; BOS, prompt and instruction positions are ignored. The loss is the token-level mean over
the batch (the LM convention); :meth:`LlmPrefixCLM.utterance_losses` gives the per-utterance means.

Tensor parallelism (:mod:`nemo_ctcllm.objectives.shared.prefix`): the transcripts and then the prompts, labels
and lengths are all-gathered within the LLM's TP group, so every TP rank runs the LLM on the same concatenated
batch and gets back the gradient of its own prompts (scaled as TP=1 on its own batch). The LLM is only touched
in ``forward``.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nemo_ctcllm.config import check_choice, check_int, check_str
from nemo_ctcllm.objectives.base import Objective, ObjectiveConfig, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.checks import (
    check_block_weights,
    check_blocks,
    check_llm_hidden_size,
    encoder_depth,
)
from nemo_ctcllm.objectives.shared.prefix import prefix_clm
from nemo_ctcllm.objectives.shared.tensors import transcripts

CONNECTORS = ("linear", "mlp")


def stack_frames(x: Tensor, lengths: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """x [B, T, D], lengths [B] -> [B, ceil(T/k), k*D], ceil(lengths/k); frames past a length are zeroed."""
    B, T, D = x.shape
    valid = torch.arange(T, device=x.device)[None] < lengths[:, None]  # [B, T]
    x = x * valid[..., None].to(x.dtype)  # [B, T, D]
    T_out = -(-T // k)
    x = F.pad(x, (0, 0, 0, T_out * k - T))  # [B, T_out*k, D]
    return x.reshape(B, T_out, k * D), torch.div(lengths + k - 1, k, rounding_mode="floor")


class Connector(nn.Module):
    """Frame stacking by ``stack`` and a projection to the LLM width (``linear`` or 2-layer GELU ``mlp``)."""

    def __init__(self, d_in: int, stack: int, hidden: int, kind: str):
        super().__init__()
        self.stack = stack
        if kind == "linear":
            self.proj = nn.Linear(stack * d_in, hidden)
        else:
            self.proj = nn.Sequential(nn.Linear(stack * d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """x [B, D, T] (NeMo layout), lengths [B] -> prompt [B, T', H], prompt lengths [B]."""
        stacked, out_len = stack_frames(x.transpose(1, 2), lengths, self.stack)  # [B, T', s*D]
        return self.proj(stacked), out_len


class LlmPrefixCLM(Objective):
    """sum_k w_k * CLM_k over the connectors at ``blocks`` (docs/objectives.md)."""

    tp_collective = True  # LLM (TP) and cross-rank gathers: runs on every rank, also with no row

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        blocks: List[int],
        weights: List[float],
        connectors: nn.ModuleDict,
        instruction: str,
        every_n_steps: int = 1,
    ):
        super().__init__(name, weight, warmup_steps, capture_blocks=blocks, every_n_steps=every_n_steps)
        self.blocks = list(blocks)
        self.block_weights = [float(w) for w in weights]
        self.connectors = connectors  # str(k) -> Connector
        self.instruction = instruction

    def prompt(self, ctx: StepContext, block: int) -> Tuple[Tensor, Tensor]:
        output, length = ctx.layers[block]  # [B, D, T], [B]
        return self.connectors[str(block)](output, length)  # [B, T', H], [B]

    def utterance_losses(self, ctx: StepContext, block: int) -> Tensor:
        """Per-utterance CLM (mean over its transcript tokens) [B] for the connector at ``block``."""
        prompt, prompt_len = self.prompt(ctx, block)
        return prefix_clm(ctx.env.llm(), prompt, prompt_len, transcripts(ctx), self.instruction)[0]

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        host, texts = ctx.env.llm(), transcripts(ctx)
        total = ctx.encoded.new_zeros(())
        stats: Stats = {}
        for k, w in zip(self.blocks, self.block_weights):
            prompt, prompt_len = self.prompt(ctx, k)
            _, clm = prefix_clm(host, prompt, prompt_len, texts, self.instruction)
            total = total + w * clm.to(total.device)
            stats[f"clm_l{k}"] = clm.detach()
        return total, stats


@dataclass
class LlmPrefixCLMConfig(ObjectiveConfig):
    blocks: List[int] = field(default_factory=list)  # encoder blocks with a connector (1-based; last allowed)
    weights: List[float] = field(default_factory=list)  # one weight in [0, 1] per block
    stack: int = 4  # frames concatenated per prompt vector
    connector: str = "linear"  # one of CONNECTORS
    instruction: str = ""  # text between the prompt and the transcript
    llm_hidden_size: Optional[int] = None  # null: read from model.llm.checkpoint at construction

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_blocks(self.blocks, encoder_depth(env, key), f"{key}.blocks", allow_last=True)
        check_block_weights(self.weights, self.blocks, f"{key}.weights")
        check_int(self.stack, f"{key}.stack", 1)
        check_choice(self.connector, f"{key}.connector", CONNECTORS)
        check_str(self.instruction, f"{key}.instruction")
        check_llm_hidden_size(self.llm_hidden_size, f"{key}.llm_hidden_size")


@register_objective("llm_prefix_clm", LlmPrefixCLMConfig)
def build_llm_prefix_clm(cfg: LlmPrefixCLMConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    """One term ``llm_prefix_clm`` with a connector per block; weight ``weight``, per-block ``weights``."""
    connectors = nn.ModuleDict(
        {str(k): Connector(env.encoded_width, cfg.stack, cfg.llm_hidden_size, cfg.connector) for k in cfg.blocks}
    )
    return [
        LlmPrefixCLM(
            "llm_prefix_clm",
            blocks=cfg.blocks,
            weights=cfg.weights,
            connectors=connectors,
            instruction=cfg.instruction,
            **cfg.schedule(),
        )
    ]
