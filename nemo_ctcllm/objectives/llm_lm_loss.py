"""``llm_lm_loss``: the CTC hypothesis, made soft by the bridge, read by the frozen LLM.

Both are token-level means (the LM convention). Tensor parallelism: the LLM inputs are gathered over the TP
group (:func:`nemo_ctcllm.llm.tp.gather_llm_inputs`) so that every TP rank runs the same batch; every rank
computes the same loss, and each gets its own rows' gradient at TP=1's scale. The piece map of the bridge is
built at the first step from the ASR tokenizer, the LLM tokenizer and the LLM's (vocab-parallel) embedding
table, and kept as a plain attribute (like ``clip``'s text cache): never in ``state_dict``, a checkpoint or the
``.nemo``, never trained.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from nemo_ctcllm.config import ConfigError, check_choice, check_str
from nemo_ctcllm.llm.tp import gather_llm_inputs, pad_rows
from nemo_ctcllm.objectives.base import Objective, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.bridge import BridgeConfig, SoftHypothesis, SoftText
from nemo_ctcllm.objectives.shared.prefix import IGNORE_INDEX, prefix_clm
from nemo_ctcllm.objectives.shared.tensors import transcripts

TARGETS = ("reference", "hypothesis")


def hypothesis_clm(host, soft: SoftText, first_token: Tensor) -> Tensor:
    """Fluency: LLM next-token loss of the greedy hypothesis read as soft embeddings (token mean, TP-gathered).

    soft.embeds [b, N, H]; first_token [V] (LLM id of each piece's first token) -> scalar.
    """
    bos_ids, _ = host.tokenize([""], add_bos=True)  # [1, 1]
    bos = host.embed(bos_ids)[0].to(soft.embeds.dtype)  # [1, H]
    rows, labels = [], []
    for b, n in enumerate(soft.lengths.tolist()):
        rows.append(torch.cat([bos, soft.embeds[b, :n]]))  # [1+n, H]
        lab = torch.full((1 + n,), IGNORE_INDEX, dtype=torch.long, device=soft.embeds.device)
        lab[:n] = first_token.to(lab.device)[soft.tokens[b, :n]]  # position i (0 = BOS) predicts piece i (0-based)
        labels.append(lab)
    lengths = torch.tensor([r.shape[0] for r in rows], device=soft.embeds.device)  # [b]
    embeds = pad_rows(rows, soft.embeds)  # [b, L, H] (b may be 0: a rank with no row still joins the gather)
    labels = pad_rows(labels, soft.tokens, IGNORE_INDEX)  # [b, L]
    embeds, labels, lengths, _ = gather_llm_inputs(embeds, labels, lengths)
    if embeds.shape[0] == 0:  # no row in the whole group: no LLM call on any of its ranks; a zero in the graph
        return embeds.sum()
    return host.forward_embeds(embeds, labels, lengths=lengths)[1]


def llm_lm_loss(
    host, soft: SoftText, texts: Sequence[str], target: str, first_token: Tensor, instruction: str = ""
) -> Tensor:
    """The loss of docs/objectives.md for a soft hypothesis (``target``: reference or hypothesis); a scalar,
    identical on every rank of the LLM's TP group."""
    if target == "reference":
        return prefix_clm(host, soft.embeds, soft.lengths, texts, instruction)[1]
    return hypothesis_clm(host, soft, first_token)


class LLMLMLoss(Objective):
    """The frozen LLM's loss on the soft CTC hypothesis (``target``: reference or hypothesis)."""

    tp_collective = True  # LLM (TP) and cross-rank gathers: runs on every rank, also with no row

    def __init__(
        self, name, weight, warmup_steps, reader: SoftHypothesis, target: str, instruction: str, every_n_steps: int = 1
    ):
        super().__init__(
            name,
            weight,
            warmup_steps,
            capture_blocks=[reader.head_block] if reader.head_block else [],
            every_n_steps=every_n_steps,
        )
        self.reader = reader
        self.target = target
        self.instruction = instruction

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        host = ctx.env.llm()
        soft = self.reader(ctx, host.tokenizer, host.embed, self.training)
        loss = llm_lm_loss(host, soft, transcripts(ctx), self.target, self.reader.pmap.first_token, self.instruction)
        stats = {"hyp_tokens": soft.lengths.float().mean().detach()}
        return loss.to(ctx.log_probs.device), stats


@dataclass
class LLMLMLossConfig(BridgeConfig):
    target: str = "reference"  # one of TARGETS
    instruction: str = ""  # text between the hypothesis and the reference (target: reference)

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        check_choice(self.target, f"{key}.target", TARGETS)
        check_str(self.instruction, f"{key}.instruction")
        if self.target == "hypothesis" and self.instruction:
            raise ConfigError(f"{key}.instruction is only used with target: reference")


@register_objective("llm_lm_loss", LLMLMLossConfig)
def build_llm_lm_loss(cfg: LLMLMLossConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    return [
        LLMLMLoss("llm_lm_loss", reader=cfg.reader(), target=cfg.target, instruction=cfg.instruction, **cfg.schedule())
    ]
