"""``llm_prefix_clm``: the frozen LLM as a linguistic regularizer of the encoder (LAIL, arXiv 2506.22846).

A *connector* after encoder block k (1-based; the last block is allowed) turns the block's output into a
soft prompt for the frozen LLM, and the LLM's causal-LM loss on the ground-truth transcript, given that
prompt, is the loss. Its gradient reaches the encoder only through the prompt (the LLM is frozen):

    connector_k(x) = proj( stack_s(x) ),   x [B, T, D] -> [B, ceil(T/s), s*D] -> [B, T', H]
        stack_s: concatenate s consecutive frames (frames past an utterance's length are zeroed first,
                 so the last, partial group never sees another utterance's padding); lengths ceil(len/s)
        proj:    ``linear`` Linear(s*D, H) or ``mlp`` Linear(s*D, H) -> GELU -> Linear(H, H)

    LLM sequence of utterance b (right padded to the batch max, so padding never reaches a valid position):
        [ BOS | prompt_b (T'_b frames) | instruction tokens | transcript tokens | EOS ]
    CLM_k = sum_b sum_{u in transcript+EOS} -log p_LLM(y_{b,u} | everything before it)  /  #counted tokens

    loss = sum_k weights[k] * CLM_k          (one LLM pass per connector, as in LAIL; logged as clm_l<k>)

Prompt layout choices: BOS comes first because every LLaMA training sequence starts with it (position 0 is
the attention sink); the transcript follows the prompt/instruction directly. The transcript is the ASR
tokenizer's ``ids_to_text`` of the target ids, re-tokenized with the LLM's tokenizer (with a leading space
when an instruction precedes it, the natural continuation of "Transcribe:"). Only transcript tokens and
EOS are counted; BOS, prompt and instruction positions are ignored. The loss is the token-level mean over
the batch (the LM convention); :meth:`LlmPrefixCLM.utterance_losses` gives the per-utterance means.

Tensor parallelism: the transcripts (whose vocab-parallel embedding lookup is itself a TP collective) and
then the prompts, labels and lengths are all-gathered within the LLM's TP group (:mod:`nemo_ctcllm.llm.tp`), so every TP rank runs the LLM on the same concatenated batch and gets back the
gradient of its own prompts (scaled as TP=1 on its own batch). The LLM is only touched in ``forward``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from nemo_ctcllm.llm.tp import gather_llm_inputs, gather_objects
from nemo_ctcllm.objectives.common import resolve_llm_hidden_size, transcripts
from nemo_ctcllm.objectives.base import (
    ConfigError,
    Objective,
    StepContext,
    Stats,
    check_choice,
    check_int,
    register_objective,
)
from nemo_ctcllm.objectives.ctc import check_block_weights, check_blocks, encoder_depth

IGNORE_INDEX = -100
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


def build_sequences(host, prompt: Tensor, prompt_len: Tensor, texts: Sequence[str], instruction: str):
    """LLM inputs for [BOS | prompt | instruction | transcript | EOS], right padded.

    prompt [b, P, H], prompt_len [b] -> embeds [b, L, H] (prompt dtype; grad flows to ``prompt``),
    labels [b, L] (megatron-shifted: labels[:, t] is the token at t+1; only transcript and EOS counted),
    lengths [b].
    """
    sep = " " if instruction else ""
    bos_ids, _ = host.tokenize([""], add_bos=True)  # [1, 1]
    instr_ids, instr_len = host.tokenize([instruction], add_bos=False)  # [1, I]
    n_instr = int(instr_len[0])
    head = host.embed(torch.cat([bos_ids, instr_ids], 1))[0].to(prompt.dtype)  # [1+I, H]: BOS, instruction
    # the (vocab-parallel) embedding lookup is a TP collective: every TP rank embeds the group's transcripts
    all_texts, mine = gather_objects(texts)
    text_ids, text_len = host.tokenize([sep + t for t in all_texts], add_bos=False, add_eos=True)  # [B, U], [B]
    text_emb = host.embed(text_ids)[mine].to(prompt.dtype)  # [b, U, H]
    text_ids, text_len = text_ids[mine].to(prompt.device), text_len[mine]  # [b, U], [b]
    rows: List[Tensor] = []
    labels: List[Tensor] = []
    for b, (P, U) in enumerate(zip(prompt_len.tolist(), text_len.tolist())):
        seq = torch.cat([head[:1], prompt[b, :P], head[1: 1 + n_instr], text_emb[b, :U]])  # [1+P+I+U, H]
        lab = torch.full((seq.shape[0],), IGNORE_INDEX, dtype=torch.long, device=prompt.device)  # [1+P+I+U]
        start = 1 + P + n_instr  # position of the first transcript token; it is predicted at start-1
        lab[start - 1: start - 1 + U] = text_ids[b, :U]
        rows.append(seq)
        labels.append(lab)
    lengths = torch.tensor([r.shape[0] for r in rows], device=prompt.device)  # [b]
    embeds = pad_sequence(rows, batch_first=True)  # [b, L, H]
    return embeds, pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX), lengths


def prefix_clm(host, prompt: Tensor, prompt_len: Tensor, texts: Sequence[str], instruction: str = ""):
    """CLM of ``texts`` given soft prompts, gathered over the TP group.

    Returns (per-utterance mean token loss [b] of this rank's rows, loss: token-level mean over the TP
    group's concatenated batch -- at TP=1, over this batch).
    """
    embeds, labels, lengths = build_sequences(host, prompt, prompt_len, texts, instruction)
    embeds, labels, lengths, rows = gather_llm_inputs(embeds, labels, lengths)  # [B, L, H], [B, L], [B]
    token_loss, loss = host.forward_embeds(embeds, labels, lengths=lengths)  # [B, L], scalar
    counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1).to(token_loss.device)  # [B]
    return (token_loss.sum(1) / counts)[rows], loss


class LlmPrefixCLM(Objective):
    """sum_k w_k * CLM_k over the connectors at ``blocks`` (see the module docstring)."""

    def __init__(self, name, weight, warmup_steps, blocks: List[int], weights: List[float], connectors: nn.ModuleDict,
                 instruction: str):
        super().__init__(name, weight, warmup_steps, capture_blocks=blocks)
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
        return prefix_clm(ctx.model.llm, prompt, prompt_len, transcripts(ctx), self.instruction)[0]

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        host, texts = ctx.model.llm, transcripts(ctx)
        total = ctx.encoded.new_zeros(())
        stats: Stats = {}
        for k, w in zip(self.blocks, self.block_weights):
            prompt, prompt_len = self.prompt(ctx, k)
            _, clm = prefix_clm(host, prompt, prompt_len, texts, self.instruction)
            total = total + w * clm.to(total.device)
            stats[f"clm_l{k}"] = clm.detach()
        return total, stats


@register_objective(
    "llm_prefix_clm",
    defaults={"blocks": [], "weights": [], "stack": 4, "connector": "linear", "instruction": "",
              "llm_hidden_size": None},
)
def build_llm_prefix_clm(block: DictConfig, model, key: str) -> List[Objective]:
    """One term ``llm_prefix_clm`` with a connector per block; weight ``weight``, per-block ``weights``."""
    depth = encoder_depth(model, key)
    blocks = check_blocks(list(block.blocks), depth, f"{key}.blocks", allow_last=True)
    weights = check_block_weights(block.weights, blocks, f"{key}.weights")
    stack = check_int(block.stack, f"{key}.stack", 1)  # frames concatenated per prompt vector
    check_choice(block.connector, f"{key}.connector", CONNECTORS)
    if not isinstance(block.instruction, str):
        raise ConfigError(f"{key}.instruction must be a string, got {block.instruction!r}")
    hidden = resolve_llm_hidden_size(model, block, key)
    d_in = model.decoder._feat_in  # width of captured block outputs (after the encoder's out_proj, if any)
    connectors = nn.ModuleDict({str(k): Connector(d_in, stack, hidden, block.connector) for k in blocks})
    return [LlmPrefixCLM("llm_prefix_clm", block.weight, block.warmup_steps, blocks, weights, connectors,
                         block.instruction)]
