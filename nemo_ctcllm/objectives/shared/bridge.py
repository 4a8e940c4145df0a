"""The differentiable ASR-to-LM bridge: CTC posteriors -> soft token embeddings in a language model's input space.

Used by ``llm_lm_loss``, ``mlm`` and ``lang_contrastive``. Text decoded by argmax carries no gradient; the
bridge keeps the *segmentation* of the greedy decode (a discrete choice, made without grad) and makes the
*content* of every emitted token a differentiable function of the posteriors.

1. Segmentation (no grad). With a_t = argmax_v log p_t(v) over the V+1 classes (blank = V, last, as NeMo) and
   valid frames t < T_b, frame t is *emitted* when a_t != blank; a new segment starts at an emitted frame
   whose predecessor is blank, invalid, or a different token (CTC's merge rule: ``a a`` is one token,
   ``a <b> a`` two). Segment n of utterance b is its set of frames S_n; its token is y_n = a_t (t in S_n), so
   the segments' tokens are exactly the greedy CTC transcript.

2. Pooling (differentiable). The posteriors of a segment's frames are averaged and renormalised without blank
   (and without the pieces that have no LM tokenization, see 3):

       q_n(v) = sum_{t in S_n} p_t(v) / sum_{v' in K} sum_{t in S_n} p_t(v'),    v in K (mappable pieces)

   Every frame of S_n has p_t(y_n) >= p_t(v) for all v, so argmax_v q_n = y_n: the soft token agrees with the
   greedy transcript.

3. The piece map M [V, E] (fixed, never trained). Row v is the mean input embedding of the LM tokens of piece
   v's surface text (SentencePiece's word-boundary mark U+2581 becomes a space), tokenized by the LM's own
   tokenizer without special tokens, the LM's unknown token removed:  M[v] = mean_j E_LM[tok_j(text(v))].
   One LM position per ASR piece (the mean-embedding approximation): a piece that the LM splits into several
   tokens is represented by the centroid of their embeddings, so the LM sees sequences of the ASR tokenizer's
   length, not its own. The alternative (expanding every piece into its LM token sequence) would make the
   sequence layout depend on the argmax and leave no single position to carry the soft weights of competing
   pieces; the centroid keeps one position per decision and an exact Jacobian. With small ASR vocabularies
   most pieces are at most one LM token anyway (measured in the tests for SmolLM2).
   Pieces with no clean LM tokenization are *unmappable* (``K`` excludes them, row of M is 0): the ASR
   tokenizer's control/unknown pieces (``<unk>``), and pieces whose text tokenizes to nothing or only to the
   LM's unknown token (a lone word-boundary mark ``▁`` under a whitespace-splitting LM tokenizer, characters
   outside a word-level vocabulary). Their probability mass is renormalised away in q, and segments whose
   greedy token is unmappable are dropped from the LM sequence (they have no LM token to stand for).
   Byte-level BPE LMs (GPT-2 / LLaMA-3 / SmolLM2 style) tokenize every string, so there every ordinary piece is
   mappable, a lone ``▁`` included (it becomes the LM's space token).

4. Estimators (``estimator``), e_n in the LM's input space [E]:

   * ``expected``          e_n = q_n M                          (the posterior-weighted, "soft" embedding)
   * ``straight_through``  e_n = onehot(y_n) M  in the forward pass, d e_n / d q_n = M in the backward pass
                           (Bengio et al. 2013, arXiv 1308.3432): the LM reads exactly the greedy hypothesis'
                           embeddings, the gradient is that of ``expected``
   * ``gumbel``            e_n = softmax((log q_n + g_n) / tau) M,  g_n ~ Gumbel(0, 1) i.i.d.
                           (Jang et al. 2017, arXiv 1611.01144; Maddison et al., arXiv 1611.00712); with ``hard``
                           the forward pass uses the one-hot argmax of the relaxed sample, the backward the relaxed
                           sample (straight-through Gumbel)

   The gradient reaches the encoder through q_n, i.e. through the posteriors of the frames of each segment;
   d e_n / d p_t(v) = (M[v] - e_n) / Z_n for t in S_n (``expected``), Z_n = the segment's unnormalised mass:
   raising a frame's posterior of piece v moves the segment's embedding towards M[v].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_ctcllm.config import ConfigError, check_bool, check_choice, check_number
from nemo_ctcllm.objectives.base import ObjectiveConfig, ObjectiveEnv, StepContext

ESTIMATORS = ("expected", "straight_through", "gumbel")
WORD_BOUNDARY = "\u2581"  # SentencePiece's word-boundary mark


# ---------------------------------------------------------------------------------------------- the piece map
def asr_pieces(tokenizer) -> Tuple[List[str], List[bool]]:
    """The ASR vocabulary of a NeMo tokenizer: (piece strings [V], special [V]: control/unknown pieces).

    Special pieces are SentencePiece's unknown/control ids when the tokenizer wraps a SentencePiece model,
    else pieces spelled like ``<unk>`` / ``<pad>`` / ``<s>`` / ``</s>``.
    """
    V = tokenizer.vocab_size
    pieces = [tokenizer.ids_to_tokens([i])[0] for i in range(V)]
    sp = getattr(tokenizer, "tokenizer", None)
    if sp is not None and hasattr(sp, "is_unknown") and hasattr(sp, "is_control"):
        special = [bool(sp.is_unknown(i) or sp.is_control(i)) for i in range(V)]
    else:
        special = [p in ("<unk>", "<pad>", "<s>", "</s>") for p in pieces]
    return pieces, special


def piece_token_ids(pieces: Sequence[str], special: Sequence[bool], lm_tokenizer) -> List[List[int]]:
    """LM token ids of every ASR piece's surface text (``[]`` = unmappable; see the module docstring, 3)."""
    unk = getattr(lm_tokenizer, "unk_token_id", None)
    out: List[List[int]] = []
    for piece, is_special in zip(pieces, special):
        if is_special:
            out.append([])
            continue
        ids = lm_tokenizer(piece.replace(WORD_BOUNDARY, " "), add_special_tokens=False)["input_ids"]
        out.append([i for i in ids if i != unk])
    return out


def piece_embedding_matrix(token_ids: Sequence[Sequence[int]], embed: Callable[[Tensor], Tensor]) -> Tensor:
    """M [V, E]: row v = mean LM input embedding of ``token_ids[v]`` (0 for unmappable pieces).

    ``embed(ids [1, N]) -> [1, N, E]`` is the LM's input embedding lookup (``LLMHost.embed`` is a TP collective:
    every rank of the group must call this with the same ids, which it does, the tokenizers being the same).
    """
    flat = torch.tensor([[i for ids in token_ids for i in ids]], dtype=torch.long)  # [1, N]
    emb = embed(flat)[0].detach().float()  # [N, E]
    owner = torch.tensor([v for v, ids in enumerate(token_ids) for _ in ids], device=emb.device)  # [N]
    M = emb.new_zeros(len(token_ids), emb.shape[1])  # [V, E]
    M.index_add_(0, owner, emb)
    counts = torch.tensor([len(ids) for ids in token_ids], device=emb.device, dtype=emb.dtype)  # [V]
    return M / counts.clamp(min=1)[:, None]


@dataclass
class PieceMap:
    """Everything the bridge needs about one (ASR tokenizer, LM) pair, built once."""

    matrix: Tensor  # [V, E] fp32, 0 on unmappable rows
    mappable: Tensor  # [V] bool
    first_token: Tensor  # [V] long: the first LM token of each piece (-100 when unmappable)

    @classmethod
    def build(cls, pieces, special, lm_tokenizer, embed: Callable[[Tensor], Tensor]) -> "PieceMap":
        ids = piece_token_ids(pieces, special, lm_tokenizer)
        return cls(
            matrix=piece_embedding_matrix(ids, embed),
            mappable=torch.tensor([bool(x) for x in ids]),
            first_token=torch.tensor([x[0] if x else -100 for x in ids], dtype=torch.long),
        )

    def to(self, device) -> "PieceMap":
        return PieceMap(self.matrix.to(device), self.mappable.to(device), self.first_token.to(device))


# ---------------------------------------------------------------------------------------------- segmentation
@torch.no_grad()
def greedy_segments(log_probs: Tensor, lengths: Tensor, keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Greedy CTC segmentation (no grad).

    log_probs [B, T, V+1] (blank last), lengths [B]; keep [V] bool: tokens allowed to open a segment
    (segments of other tokens are dropped, their frames unassigned).
    Returns seg [B, T] long (segment index of each frame, -1 = blank / padding / dropped), tokens [B, N]
    (greedy token of each segment, 0 past n_seg), n_seg [B].
    """
    B, T, C = log_probs.shape
    blank = C - 1
    best = log_probs.argmax(-1)  # [B, T]
    valid = (torch.arange(T, device=best.device)[None] < lengths.to(best.device)[:, None]) & (best != blank)  # [B, T]
    prev = F.pad(best, (1, 0), value=-1)[:, :-1]  # [B, T]: a_{t-1}
    prev_valid = F.pad(valid, (1, 0), value=False)[:, :-1]  # [B, T]
    start = valid & ~(prev_valid & (prev == best))  # [B, T]: first frame of a segment
    seg = torch.cumsum(start.long(), 1) - 1  # [B, T]
    seg = torch.where(valid, seg, -1)
    if keep is not None:  # drop segments of unmappable tokens and renumber the rest
        kept = keep.to(best.device)[best.clamp(max=blank - 1)]  # [B, T] (blank frames are not valid anyway)
        start = start & kept
        seg = torch.where(valid & kept, torch.cumsum(start.long(), 1) - 1, -1)
    n_seg = start.sum(1)  # [B]
    N = max(int(n_seg.max()) if B else 0, 1)
    tokens = torch.zeros(B, N, dtype=torch.long, device=best.device)  # [B, N]
    b, t = start.nonzero(as_tuple=True)
    tokens[b, seg[b, t]] = best[b, t]
    return seg, tokens, n_seg


def pool_segments(log_probs: Tensor, seg: Tensor, n_max: int, mappable: Optional[Tensor] = None) -> Tensor:
    """q [B, N, V]: per segment, the mean of its frames' posteriors renormalised over the mappable non-blank
    pieces (module docstring, 2). Differentiable w.r.t. ``log_probs`` [B, T, V+1]; rows past n_seg are 0."""
    probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32)).exp()[..., :-1]  # [B, T, V]
    if mappable is not None:
        probs = probs * mappable.to(probs)
    assign = (seg[:, None, :] == torch.arange(n_max, device=seg.device)[None, :, None]).to(probs)  # [B, N, T]
    mass = torch.bmm(assign, probs)  # [B, N, V]
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)


@dataclass
class SoftText:
    """A soft CTC hypothesis: q [B, N, V], embeddings [B, N, E], greedy tokens [B, N], lengths [B]."""

    q: Tensor
    embeds: Tensor
    tokens: Tensor
    lengths: Tensor


def soft_embed(
    q: Tensor,
    matrix: Tensor,
    estimator: str,
    tau: float = 1.0,
    hard: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """q [B, N, V] -> embeddings [B, N, E] by one of :data:`ESTIMATORS` (module docstring, 4)."""
    if estimator == "expected":
        weights = q
    elif estimator == "straight_through":
        onehot = F.one_hot(q.argmax(-1), q.shape[-1]).to(q)  # [B, N, V]
        weights = onehot + q - q.detach()
    elif estimator == "gumbel":
        u = torch.rand(q.shape, generator=generator, device="cpu" if generator is not None else q.device)
        g = -torch.log(-torch.log(u.to(q.device).clamp(1e-10, 1.0 - 1e-7)))  # [B, N, V] ~ Gumbel(0, 1)
        soft = ((q.clamp(min=1e-30).log() + g) / tau).softmax(-1)  # [B, N, V]
        weights = F.one_hot(soft.argmax(-1), q.shape[-1]).to(q) + soft - soft.detach() if hard else soft
    else:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    return weights @ matrix.to(q)  # [B, N, E]


def bridge(
    log_probs: Tensor,
    lengths: Tensor,
    pmap: PieceMap,
    estimator: str = "expected",
    tau: float = 1.0,
    hard: bool = False,
    generator: Optional[torch.Generator] = None,
) -> SoftText:
    """CTC log-probs [B, T, V+1] (blank last), lengths [B] -> the soft hypothesis in the LM's input space."""
    pmap = pmap.to(log_probs.device)
    seg, tokens, n_seg = greedy_segments(log_probs, lengths, keep=pmap.mappable)
    q = pool_segments(log_probs, seg, tokens.shape[1], pmap.mappable)  # [B, N, V]
    embeds = soft_embed(q, pmap.matrix, estimator, tau, hard, generator)  # [B, N, E]
    pad = torch.arange(tokens.shape[1], device=q.device)[None] >= n_seg[:, None]  # [B, N]
    return SoftText(q=q, embeds=embeds.masked_fill(pad[..., None], 0.0), tokens=tokens, lengths=n_seg)


# ---------------------------------------------------------------------------------------------- used by the objectives
@dataclass
class BridgeConfig(ObjectiveConfig):
    """The bridge keys of an objective block (``llm_lm_loss``, ``mlm``, ``lang_contrastive``)."""

    estimator: str = "expected"  # one of ESTIMATORS
    gumbel_tau: float = 1.0  # temperature of ``gumbel``
    gumbel_hard: bool = False  # ``gumbel``: straight-through one-hot forward
    head_block: Optional[int] = None  # null: the final CTC head; k: the interctc head at block k

    def check(self, key: str, env: ObjectiveEnv) -> None:
        """``head_block: k`` reads the CTC hypothesis of the intermediate head at block k, which must be one of
        ``model.objectives.interctc.blocks`` (the head is trained by interctc, the objective only reads it)."""
        super().check(key, env)
        check_choice(self.estimator, f"{key}.estimator", ESTIMATORS)
        check_number(self.gumbel_tau, f"{key}.gumbel_tau", 0.0, 100.0, low_open=True)
        check_bool(self.gumbel_hard, f"{key}.gumbel_hard")
        k, blocks = self.head_block, list(env.interctc_blocks)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k not in blocks):
            raise ConfigError(
                f"{key}.head_block must be null (the final CTC head) or one of the interctc blocks "
                f"{blocks} (model.objectives.interctc.blocks), got {k!r}"
            )

    def reader(self) -> "SoftHypothesis":
        return SoftHypothesis(self.head_block, self.estimator, float(self.gumbel_tau), self.gumbel_hard)


class SoftHypothesis:
    """What an objective reads through the bridge: the soft greedy hypothesis of one CTC head, in one LM's space.

    A plain object (not a module): the piece map is built at the first call from the ASR tokenizer, the LM
    tokenizer and ``embed`` (the LM's input embedding lookup), and is never in ``state_dict``, a checkpoint or
    the ``.nemo``, and never trained.
    """

    def __init__(self, head_block: Optional[int], estimator: str, tau: float, hard: bool):
        self.head_block, self.estimator, self.tau, self.hard = head_block, estimator, tau, hard
        self.pmap: Optional[PieceMap] = None

    def __call__(
        self, ctx: StepContext, lm_tokenizer, embed: Callable[[Tensor], Tensor], training: bool = True
    ) -> SoftText:
        """The soft hypothesis of ``ctx``. Out of training (validation) ``gumbel`` draws no noise: it becomes
        ``expected`` (``straight_through`` with ``gumbel_hard``), so that validation losses are deterministic."""
        if self.pmap is None:
            pieces, special = asr_pieces(ctx.env.tokenizer)
            self.pmap = PieceMap.build(pieces, special, lm_tokenizer, embed)
        log_probs, lengths = ctx.head_log_probs(self.head_block)  # [B, T, V+1], [B]
        if self.pmap.matrix.device != log_probs.device:  # once, not every step
            self.pmap = self.pmap.to(log_probs.device)
        estimator = self.estimator
        if not training and estimator == "gumbel":
            estimator = "straight_through" if self.hard else "expected"
        return bridge(log_probs, lengths, self.pmap, estimator, self.tau, self.hard)
