"""``mlm``: a masked language model reads the soft CTC transcription and predicts its masked tokens.

The greedy hypothesis of the final CTC head (or of the interctc head at ``head_block``) goes through the bridge
(:mod:`nemo_ctcllm.objectives.shared.bridge`) into the *MLM's* input space: soft token distributions q_n over the ASR
pieces and embeddings e_n = q_n M_mlm (M_mlm built from the MLM's tokenizer and input embedding table). A random
fraction ``mask_prob`` of the N positions (at least one per non-empty hypothesis) is replaced by the MLM's
``[MASK]`` embedding; the MLM reads ``[CLS] ẽ_1 .. ẽ_N [SEP]`` through ``inputs_embeds`` and predicts each
masked position n. Its prediction over the ASR pieces is

    p_n(v) = softmax_{v in K}( z_n[first(v)] )        z_n: the MLM's logits at n, first(v): the first MLM token
                                                      of piece v, K: the pieces with an MLM tokenization

and the loss is the divergence of the MLM's prediction from the CTC posteriors at the masked positions:

    L = 1/|masked| sum_{n masked} KL(q_n || p_n) = 1/|masked| sum_{n masked} sum_v q_n(v) (log q_n(v) - log p_n(v))

Why this loss. The masked tokens of the *hypothesis* are the target because nothing else is aligned with the
hypothesis' positions (the reference has another length; aligning it would need a second alignment and puts
the CTC loss' job into this term). With hard argmax labels the loss would carry no gradient into the
posteriors; with q as the soft label, d L / d q_n(v) = (log q_n(v) - log p_n(v) + 1) / |masked|: at every
masked position the encoder is pushed towards the pieces that the MLM, reading the *context*, finds more
likely than the CTC head does, and away from those it finds implausible -- a language-structure gradient. The
context (unmasked soft embeddings) is differentiable too, so the neighbours' posteriors also receive the
gradient that would make the masked token more predictable. KL rather than the soft-label cross-entropy
-sum q log p: the two differ by the entropy H(q_n), whose minimisation would only sharpen the CTC posteriors
(a confidence penalty in reverse), not move them towards the language model; with a fine-tuned MLM both give
the MLM the same gradient. The CTC terms keep the posteriors anchored to the audio (alone, this term would
prefer whatever the MLM predicts).

``finetune: false`` (default): the MLM is frozen (eval mode, ``requires_grad=False``) and, like the LLM, kept
out of the module tree (never in ``state_dict``, the ``.nemo`` or the optimizer); it is loaded on the first
step from ``model_dir``. ``finetune: true``: the MLM is loaded at construction and registered as a submodule,
so the optimizer trains it on the same loss (it learns to predict the CTC transcriptions of the training
audio, the "fine-tuned" variant of the issue); its input embeddings stay frozen so that M_mlm stays valid.
Either way it is training-only and dropped at export. (The issue's other route, a prediction head on the
encoder that predicts masked tokens, needs no external MLM and is the territory of ``joint_lm``; it is not
duplicated here.)

Any Hugging Face ``AutoModelForMaskedLM`` folder works (BERT, DistilBERT, RoBERTa, ...; it must accept
``inputs_embeds`` and have a mask token). ``scripts/train_mlm.py --asr-tokenizer <ASR tokenizer>`` trains the
recommended one: a small BERT whose vocabulary *is* the ASR pieces, so M_mlm is exact (one MLM token per piece)
and the MLM has read text segmented exactly as the CTC head segments it. An MLM with its own tokenizer reads the
hypothesis one ASR piece per position, each piece as the mean embedding of its MLM tokens: with a small ASR
vocabulary that is text split into near-characters, which such an MLM has never seen (measured with a byte-level
BPE MLM: its top piece at masked positions of correct transcripts was right 3.9 % of the time). With a
WordPiece tokenizer word-internal ASR pieces also map to whole-word tokens. Hypotheses longer than the MLM's
positions are truncated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from nemo_ctcllm.config import ConfigError, check_bool, check_number
from nemo_ctcllm.objectives.base import Objective, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.bridge import BridgeConfig, PieceMap, SoftHypothesis, SoftText


def load_mlm(model_dir: str):
    """(model, tokenizer) of an ``AutoModelForMaskedLM`` folder, offline."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"the masked LM in {model_dir} has no mask token")
    return model, tokenizer


def frame_ids(tokenizer) -> List[int]:
    """[CLS], [SEP], [MASK], [PAD] ids of an MLM tokenizer (BOS / EOS where there is no CLS / SEP)."""
    def first(*ids):
        return next((i for i in ids if i is not None), 0)

    t = tokenizer
    return [first(t.cls_token_id, t.bos_token_id), first(t.sep_token_id, t.eos_token_id), t.mask_token_id,
            first(t.pad_token_id)]


def draw_mask(lengths: Tensor, size: int, prob: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """[B, size] bool: each valid position masked with probability ``prob``, at least one per non-empty row."""
    u = torch.rand(lengths.shape[0], size, generator=generator).to(lengths.device)  # [B, N]
    valid = torch.arange(size, device=lengths.device)[None] < lengths[:, None]  # [B, N]
    mask = (u < prob) & valid
    forced = u.masked_fill(~valid, 2.0).argmin(1)  # [B]: the valid position with the smallest draw
    mask[torch.arange(lengths.shape[0]), forced] |= lengths > 0
    return mask


def kept_positions(mlm, n: int) -> int:
    """How many of n hypothesis positions the MLM reads: long hypotheses are truncated ([CLS] and [SEP] take two
    of its ``max_position_embeddings``)."""
    return min(n, getattr(mlm.config, "max_position_embeddings", n + 2) - 2)


def mlm_soft_label_loss(mlm, mlm_tokenizer, pmap: PieceMap, soft: SoftText, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """The loss of the module docstring for a given mask [B, N] (True = masked).

    Returns (loss: mean over masked positions, accuracy: how often the MLM's top piece is the greedy token).
    Masked positions past the truncation are dropped; with none left the loss is 0 (still attached to the
    posteriors' graph) instead of a mean over nothing (NaN).
    """
    emb = mlm.get_input_embeddings()
    B, N, _ = soft.embeds.shape
    N = kept_positions(mlm, N)
    lengths = soft.lengths.clamp(max=N)  # [B]
    mask = mask[:, :N] & (torch.arange(N, device=mask.device)[None] < lengths[:, None])  # [B, N]
    if not mask.any():
        zero = soft.q.sum() * 0.0
        return zero, zero.detach()
    special = torch.tensor(frame_ids(mlm_tokenizer), device=emb.weight.device)
    cls, sep, msk, pad = emb(special).to(soft.embeds)  # [E] each
    x = torch.where(mask[..., None], msk, soft.embeds[:, :N])  # [B, N, E]
    x = torch.cat([cls.expand(B, 1, -1), x, pad.expand(B, 1, -1)], 1)  # [B, N+2, E]
    x[torch.arange(B), lengths + 1] = sep  # [CLS] e_1..e_n [SEP] <pad>...
    attn = (torch.arange(N + 2, device=x.device)[None] < (lengths + 2)[:, None]).long()  # [B, N+2]
    logits = mlm(inputs_embeds=x, attention_mask=attn).logits[:, 1: N + 1]  # [B, N, V_mlm]
    first = pmap.first_token.to(logits.device)  # [V]
    scores = logits[mask][:, first.clamp(min=0)].float()  # [M, V]: logit of each piece's first MLM token
    log_p = scores.masked_fill(~pmap.mappable.to(logits.device), float("-inf")).log_softmax(-1)  # [M, V]
    q = soft.q[:, :N][mask]  # [M, V]
    kl = q * (q.clamp(min=1e-30).log() - log_p.masked_fill(q == 0, 0.0))  # [M, V]; 0 where q = 0
    loss = kl.sum(-1).mean()
    acc = (log_p.argmax(-1) == soft.tokens[:, :N][mask]).float().mean()
    return loss, acc.detach()


class MaskedLMObjective(Objective):
    """KL(CTC posteriors || MLM prediction) at masked positions of the soft CTC transcription (module docstring)."""

    def __init__(self, name, weight, warmup_steps, reader: SoftHypothesis, model_dir: str, mask_prob: float,
                 finetune: bool, every_n_steps: int = 1):
        super().__init__(name, weight, warmup_steps, capture_blocks=[reader.head_block] if reader.head_block else [],
                         every_n_steps=every_n_steps)
        self.reader, self.model_dir, self.mask_prob, self.finetune = reader, model_dir, mask_prob, finetune
        self.mlm_tokenizer = None
        if finetune:
            self.mlm, self.mlm_tokenizer = load_mlm(model_dir)  # a submodule: trained, checkpointed
            self.mlm.get_input_embeddings().requires_grad_(False)  # M_mlm is built from it: keep it fixed

    def masked_lm(self, device):
        """The MLM (frozen: loaded on first use, outside the module tree) and its tokenizer."""
        if self.finetune:
            return self.mlm, self.mlm_tokenizer
        mlm = self.__dict__.get("_frozen_mlm")
        if mlm is None:
            mlm, self.mlm_tokenizer = load_mlm(self.model_dir)
            mlm.eval().requires_grad_(False)
            self.__dict__["_frozen_mlm"] = mlm  # plain attribute: not a submodule (see the module docstring)
        return mlm.to(device), self.mlm_tokenizer

    def forward(self, ctx: StepContext) -> Tuple[Tensor, Stats]:
        mlm, tok = self.masked_lm(ctx.log_probs.device)
        emb = mlm.get_input_embeddings()
        soft = self.reader(ctx, tok, lambda ids: emb(ids.to(emb.weight.device)), self.training)
        n = kept_positions(mlm, soft.tokens.shape[1])  # drawn where the MLM reads: >= 1 per non-empty hypothesis
        mask = draw_mask(soft.lengths.clamp(max=n), n, self.mask_prob)  # [B, n]
        if not mask.any():  # every hypothesis is empty: nothing to predict
            zero = ctx.log_probs.sum() * 0.0
            return zero, {"acc": zero.detach(), "masked": zero.detach()}
        loss, acc = mlm_soft_label_loss(mlm, tok, self.reader.pmap, soft, mask)
        return loss, {"acc": acc, "masked": mask.sum().float().detach()}


@dataclass
class MaskedLMConfig(BridgeConfig):
    model_dir: Optional[str] = None  # a local Hugging Face AutoModelForMaskedLM folder
    mask_prob: float = 0.15  # fraction of the hypothesis' positions masked (at least one)
    finetune: bool = False  # train the MLM too (its input embeddings stay frozen)

    def check(self, key: str, env: ObjectiveEnv) -> None:
        super().check(key, env)
        if not isinstance(self.model_dir, str) or not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            raise ConfigError(f"{key}.model_dir must be a local Hugging Face AutoModelForMaskedLM folder (with "
                              f"config.json), e.g. the one scripts/train_mlm.py writes; got {self.model_dir!r}")
        check_number(self.mask_prob, f"{key}.mask_prob", 0.0, 1.0, low_open=True)
        check_bool(self.finetune, f"{key}.finetune")


@register_objective("mlm", MaskedLMConfig)
def build_mlm(cfg: MaskedLMConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    return [MaskedLMObjective("mlm", reader=cfg.reader(), model_dir=cfg.model_dir, mask_prob=float(cfg.mask_prob),
                              finetune=cfg.finetune, **cfg.schedule())]
