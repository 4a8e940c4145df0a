"""``llm_lm_loss``: the CTC hypothesis, made soft by the bridge, read by the frozen LLM.

The greedy CTC hypothesis of the final head (or of an interctc head, ``head_block``) goes through the bridge
(:mod:`nemo_ctcllm.objectives.bridge`): soft token embeddings e_1..e_N in the LLM's input space, differentiable
w.r.t. the CTC posteriors. Two losses (``target``):

* ``reference`` (default): the soft hypothesis is a prompt, the LLM's causal-LM loss of the *reference*
  transcript follows it, exactly the sequence of ``llm_prefix_clm`` with the hypothesis as the prompt:

      [ BOS | e_1 .. e_N | instruction | reference tokens | EOS ],
      L = -1/#tokens sum_u log p_LLM(y_u | BOS, e, instruction, y_<u)

  An LLM continues a text it has just read by copying it (in-context copying / induction heads), so this loss
  is low when the soft hypothesis *says* what the reference says, and the LLM's knowledge decides which errors
  cost most (a wrong word that breaks the sentence vs a plausible variant). Its gradient tells every segment's
  posteriors which pieces would make the reference more predictable: a soft, LM-weighted "match the reference".
* ``hypothesis``: a fluency term, the LLM's next-token loss of the hypothesis itself,
  [BOS | e_1 .. e_N], position n predicting the first LLM token of the greedy piece y_{n+1} (n = 0: BOS).
  Its gradient reaches the posteriors only through the context e_<n (the targets are the argmax), and it needs
  no reference, but it rewards any fluent text, so it cannot tell a right hypothesis from a fluent wrong one;
  it is kept as the cheap unsupervised variant (usable on untranscribed audio later), not the default.

Both are token-level means (the LM convention). Tensor parallelism: the LLM inputs are gathered over the TP
group (:func:`nemo_ctcllm.llm.tp.gather_llm_inputs`) so that every TP rank runs the same batch; every rank
computes the same loss, and each gets its own rows' gradient at TP=1's scale. The piece map of the bridge is
built at the first step from the ASR tokenizer, the LLM tokenizer and the LLM's (vocab-parallel) embedding
table, and kept as a plain attribute (like ``clip``'s text cache): never in ``state_dict``, a checkpoint or the
``.nemo``, never trained.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from nemo_ctcllm.llm.tp import gather_llm_inputs
from nemo_ctcllm.objectives.base import (
    ConfigError,
    Objective,
    Stats,
    StepContext,
    check_choice,
    register_objective,
)
from nemo_ctcllm.objectives.bridge import (
    BRIDGE_DEFAULTS,
    SoftHypothesis,
    SoftText,
    check_bridge_keys,
)
from nemo_ctcllm.objectives.common import transcripts
from nemo_ctcllm.objectives.llm_prefix_clm import IGNORE_INDEX, prefix_clm

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
    embeds = pad_sequence(rows, batch_first=True)  # [b, L, H]
    labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)  # [b, L]
    embeds, labels, lengths, _ = gather_llm_inputs(embeds, labels, lengths)
    return host.forward_embeds(embeds, labels, lengths=lengths)[1]


def llm_lm_loss(host, soft: SoftText, texts: Sequence[str], target: str, first_token: Tensor,
                instruction: str = "") -> Tensor:
    """The loss of the module docstring for a soft hypothesis (``target``: reference or hypothesis); a scalar,
    identical on every rank of the LLM's TP group."""
    if target == "reference":
        return prefix_clm(host, soft.embeds, soft.lengths, texts, instruction)[1]
    return hypothesis_clm(host, soft, first_token)


class LLMLMLoss(Objective):
    """The frozen LLM's loss on the soft CTC hypothesis (``target``: reference or hypothesis)."""

    def __init__(self, name, weight, warmup_steps, reader: SoftHypothesis, target: str, instruction: str):
        super().__init__(name, weight, warmup_steps, capture_blocks=[reader.head_block] if reader.head_block else [])
        self.reader = reader
        self.target = target
        self.instruction = instruction

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        host = ctx.model.llm
        soft = self.reader(ctx, host.tokenizer, host.embed, self.training)
        loss = llm_lm_loss(host, soft, transcripts(ctx), self.target, self.reader.pmap.first_token, self.instruction)
        stats = {"hyp_tokens": soft.lengths.float().mean().detach()}
        return loss.to(ctx.log_probs.device), stats


@register_objective("llm_lm_loss", defaults={**BRIDGE_DEFAULTS, "target": "reference", "instruction": ""})
def build_llm_lm_loss(block: DictConfig, model, key: str) -> List[Objective]:
    head = check_bridge_keys(block, model, key)
    check_choice(block.target, f"{key}.target", TARGETS)
    if not isinstance(block.instruction, str):
        raise ConfigError(f"{key}.instruction must be a string, got {block.instruction!r}")
    if block.target == "hypothesis" and block.instruction:
        raise ConfigError(f"{key}.instruction is only used with target: reference")
    reader = SoftHypothesis(head, block.estimator, float(block.gumbel_tau), block.gumbel_hard)
    return [LLMLMLoss("llm_lm_loss", block.weight, block.warmup_steps, reader, block.target, block.instruction)]
