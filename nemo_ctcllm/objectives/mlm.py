"""``mlm``: a masked language model reads the soft CTC transcription and predicts its masked tokens.

The maths, the YAML block and the cost: docs/objectives.md.
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
    return [
        first(t.cls_token_id, t.bos_token_id),
        first(t.sep_token_id, t.eos_token_id),
        t.mask_token_id,
        first(t.pad_token_id),
    ]


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
    """The loss of docs/objectives.md for a given mask [B, N] (True = masked).

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
    logits = mlm(inputs_embeds=x, attention_mask=attn).logits[:, 1 : N + 1]  # [B, N, V_mlm]
    first = pmap.first_token.to(logits.device)  # [V]
    scores = logits[mask][:, first.clamp(min=0)].float()  # [M, V]: logit of each piece's first MLM token
    log_p = scores.masked_fill(~pmap.mappable.to(logits.device), float("-inf")).log_softmax(-1)  # [M, V]
    q = soft.q[:, :N][mask]  # [M, V]
    kl = q * (q.clamp(min=1e-30).log() - log_p.masked_fill(q == 0, 0.0))  # [M, V]; 0 where q = 0
    loss = kl.sum(-1).mean()
    acc = (log_p.argmax(-1) == soft.tokens[:, :N][mask]).float().mean()
    return loss, acc.detach()


class MaskedLMObjective(Objective):
    """KL(CTC posteriors || MLM prediction) at masked positions of the soft CTC transcription (docs/objectives.md)."""

    def __init__(
        self,
        name,
        weight,
        warmup_steps,
        reader: SoftHypothesis,
        model_dir: str,
        mask_prob: float,
        finetune: bool,
        every_n_steps: int = 1,
    ):
        super().__init__(
            name,
            weight,
            warmup_steps,
            capture_blocks=[reader.head_block] if reader.head_block else [],
            every_n_steps=every_n_steps,
        )
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
            self.__dict__["_frozen_mlm"] = mlm  # plain attribute: not a submodule (docs/objectives.md)
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
            raise ConfigError(
                f"{key}.model_dir must be a local Hugging Face AutoModelForMaskedLM folder (with "
                f"config.json), e.g. the one scripts/train_mlm.py writes; got {self.model_dir!r}"
            )
        check_number(self.mask_prob, f"{key}.mask_prob", 0.0, 1.0, low_open=True)
        check_bool(self.finetune, f"{key}.finetune")


@register_objective("mlm", MaskedLMConfig)
def build_mlm(cfg: MaskedLMConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    return [
        MaskedLMObjective(
            "mlm",
            reader=cfg.reader(),
            model_dir=cfg.model_dir,
            mask_prob=float(cfg.mask_prob),
            finetune=cfg.finetune,
            **cfg.schedule(),
        )
    ]
