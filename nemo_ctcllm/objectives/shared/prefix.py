"""The frozen LLM's causal-LM loss of a transcript after soft prompt vectors (``llm_prefix_clm``, ``llm_lm_loss``).

    LLM sequence of utterance b (right padded to the batch max, so padding never reaches a valid position):
        [ BOS | prompt_b (P_b vectors) | instruction tokens | transcript tokens | EOS ]
    loss = sum_b sum_{u in transcript+EOS} -log p_LLM(y_{b,u} | everything before it)  /  #counted tokens

BOS comes first because every LLaMA training sequence starts with it (position 0 is the attention sink); the
transcript follows the prompt/instruction directly, re-tokenized with the LLM's tokenizer (with a leading space
when an instruction precedes it, the natural continuation of "Transcribe:"). Only transcript tokens and EOS are
counted; BOS, prompt and instruction positions are ignored.

Tensor parallelism: the transcripts (whose vocab-parallel embedding lookup is itself a TP collective) and then
the prompts, labels and lengths are all-gathered within the LLM's TP group (:mod:`nemo_ctcllm.llm.tp`), so
every TP rank runs the LLM on the same concatenated batch and gets back the gradient of its own prompts.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from nemo_ctcllm.llm.tp import gather_llm_inputs, gather_objects, pad_rows

IGNORE_INDEX = -100


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
    if not all_texts:  # no row on any rank of the group (all know it): empty inputs, no embedding lookup
        none = torch.zeros(0, 0, dtype=torch.long, device=prompt.device)  # [0, 0]
        return pad_rows([], prompt), none, none.sum(1)  # [0, 0, H], [0, 0], [0]
    text_ids, text_len = host.tokenize([sep + t for t in all_texts], add_bos=False, add_eos=True)  # [B, U], [B]
    text_emb = host.embed(text_ids)[mine].to(prompt.dtype)  # [b, U, H]
    text_ids, text_len = text_ids[mine].to(prompt.device), text_len[mine]  # [b, U], [b]
    rows: List[Tensor] = []
    labels: List[Tensor] = []
    for b, (P, U) in enumerate(zip(prompt_len.tolist(), text_len.tolist())):
        seq = torch.cat([head[:1], prompt[b, :P], head[1 : 1 + n_instr], text_emb[b, :U]])  # [1+P+I+U, H]
        lab = torch.full((seq.shape[0],), IGNORE_INDEX, dtype=torch.long, device=prompt.device)  # [1+P+I+U]
        start = 1 + P + n_instr  # position of the first transcript token; it is predicted at start-1
        lab[start - 1 : start - 1 + U] = text_ids[b, :U]
        rows.append(seq)
        labels.append(lab)
    lengths = torch.tensor([r.shape[0] for r in rows], device=prompt.device, dtype=torch.long)  # [b]
    embeds = pad_rows(rows, prompt)  # [b, L, H] (b may be 0: a rank with no row still joins the gather)
    return embeds, pad_rows(labels, text_ids, IGNORE_INDEX), lengths


def prefix_clm(host, prompt: Tensor, prompt_len: Tensor, texts: Sequence[str], instruction: str = ""):
    """CLM of ``texts`` given soft prompts, gathered over the TP group.

    Returns (per-utterance mean token loss [b] of this rank's rows, loss: token-level mean over the TP
    group's concatenated batch -- at TP=1, over this batch; the same on every TP rank, also one with b = 0).
    """
    embeds, labels, lengths = build_sequences(host, prompt, prompt_len, texts, instruction)
    embeds, labels, lengths, rows = gather_llm_inputs(embeds, labels, lengths)  # [B, L, H], [B, L], [B]
    if embeds.shape[0] == 0:  # no row in the whole group: no LLM call on any of its ranks; a zero in the graph
        return embeds.new_zeros(0), embeds.sum()
    token_loss, loss = host.forward_embeds(embeds, labels, lengths=lengths)  # [B, L], scalar
    counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1).to(token_loss.device)  # [B]
    return (token_loss.sum(1) / counts)[rows], loss
