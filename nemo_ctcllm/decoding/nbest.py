"""Batched CTC prefix beam search: the N most probable label sequences per utterance, with log p(y | x).

Why not NeMo's: ``BeamBatchedCTCInfer`` (strategy ``beam_batch``, pure torch, batched) merges equal
hypotheses with ``max`` (a Viterbi-style approximation: its score is the best alignment's, not the sum over
alignments) and identifies them by a single transcript hash; ``beam``/``pyctcdecode``/``flashlight`` run
per utterance on the CPU and need extra packages. Here every beam keeps the two prefix probabilities of
CTC prefix search (Graves 2012, "Supervised Sequence Labelling with RNNs", sec. 7.5; Hannun et al. 2014,
arXiv 1408.2873), vectorised over the batch B, the beam K and the C output classes:

    state of prefix l at frame t:   pb(l)  = log p(frames 1..t collapse to l, frame t is blank)
                                    pnb(l) = log p(frames 1..t collapse to l, frame t is not blank)
    stay   l -> l          pb'(l)  = logaddexp(pb, pnb)(l) + x_t(blank)
                           pnb'(l) = pnb(l) + x_t(last(l))                       (repeat, collapsed)
    extend l -> l+c        pnb'(l+c) = [pb(l) if c == last(l) else logaddexp(pb, pnb)(l)] + x_t(c)

If ``l+c`` is already in the beam, its extension mass is added (logaddexp) to that beam's stay mass, so
every prefix appears once; then the K best of the K stays and K*C extensions are kept. The score of a
finished prefix is logaddexp(pb, pnb) = log p(y | x) summed over every alignment that survived pruning;
with K at least the number of possible prefixes the search is exact (tested against enumeration of all
alignments). Prefix identity is a pair of polynomial hashes mod two primes below 2^31 (kept in int64 without
overflow), compared together with the parent's hash and the last label; back-pointers give the labels at
the end, so each frame costs O(B*K*C) and no label copies.

The search runs without gradients; :func:`sequence_log_probs` gives the differentiable log p(y | x) of
chosen hypotheses (torch's CTC loss, reduction 'none').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_P1, _P2 = 2147483647, 2147483629  # primes < 2^31: h * _BASE + c stays below 2^63
_BASE = 1000003
NEG_INF = float("-inf")


@dataclass
class NBest:
    """The N best hypotheses of a batch.

    ids [B, N, L] long (0-padded), lengths [B, N], scores [B, N] fp32 search log p(y | x), best first;
    -inf (and length 0) where an utterance has fewer than N distinct prefixes.
    """

    ids: Tensor
    lengths: Tensor
    scores: Tensor

    @property
    def valid(self) -> Tensor:
        """[B, N] bool: a real hypothesis."""
        return self.scores > NEG_INF


def _key(h1: Tensor, h2: Tensor) -> Tensor:
    return h1 * _P2 + h2  # < 2^62: one int64 per prefix


@torch.no_grad()
def ctc_prefix_beam_search(
    log_probs: Tensor, lengths: Tensor, beam_size: int, nbest: Optional[int] = None, blank: Optional[int] = None
) -> NBest:
    """log_probs [B, T, C] (log-softmax, blank = ``blank``, default C-1 as in NeMo), lengths [B] -> NBest.

    ``nbest`` (<= beam_size, default beam_size) hypotheses per utterance, sorted by score.
    """
    B, T, C = log_probs.shape
    K = int(beam_size)
    N = K if nbest is None else int(nbest)
    if not 1 <= N <= K:
        raise ValueError(f"nbest must be in [1, beam_size={K}], got {N}")
    blank = C - 1 if blank is None else int(blank)
    dev = log_probs.device
    lp = log_probs.float()
    lengths = lengths.to(dev)
    ninf = torch.tensor(NEG_INF, device=dev)

    pb = torch.full((B, K), NEG_INF, device=dev)  # [B, K]
    pb[:, 0] = 0.0  # the empty prefix
    pnb = torch.full((B, K), NEG_INF, device=dev)  # [B, K]
    last = torch.full((B, K), -1, dtype=torch.long, device=dev)  # last label, -1 = empty prefix
    plen = torch.zeros(B, K, dtype=torch.long, device=dev)  # prefix lengths
    h1 = torch.zeros(B, K, dtype=torch.long, device=dev)  # prefix hashes
    h2 = torch.zeros(B, K, dtype=torch.long, device=dev)
    parent_key = torch.full((B, K), -1, dtype=torch.long, device=dev)  # key of the prefix without its last label
    classes = torch.arange(C, device=dev)  # [C]
    beams = torch.arange(K, device=dev)  # [K]
    parents, emits = [], []  # per frame: [B, K] back-pointer, emitted label (-1: none)
    for t in range(T):
        x = lp[:, t]  # [B, C]
        active = (pb > NEG_INF) | (pnb > NEG_INF)  # [B, K]
        total = torch.logaddexp(pb, pnb)  # [B, K]
        stay_pb = total + x[:, blank, None]  # [B, K]
        stay_pnb = torch.where(last >= 0, pnb + x.gather(1, last.clamp(min=0)), ninf)  # [B, K]
        ext = torch.where(last[:, :, None] == classes, pb[:, :, None], total[:, :, None]) + x[:, None, :]  # [B, K, C]
        ext[:, :, blank] = NEG_INF
        # beam k2 is the extension of beam k1 by last(k2): move that mass into k2's stay
        key = _key(h1, h2)  # [B, K]
        child = (parent_key[:, None, :] == key[:, :, None]) & (plen[:, None, :] == plen[:, :, None] + 1)  # [B, K1, K2]
        child &= active[:, :, None] & active[:, None, :]
        into = ext.gather(2, last.clamp(min=0)[:, None, :].expand(B, K, K))  # [B, K1, K2] = ext[k1, last(k2)]
        stay_pnb = torch.logaddexp(stay_pnb, torch.where(child, into, ninf).logsumexp(1))  # [B, K2]
        merged = torch.zeros(B, K, C, dtype=torch.long, device=dev).scatter_reduce(
            2, last.clamp(min=0)[:, None, :].expand(B, K, K), child.long(), reduce="amax"
        )  # [B, K1, C]
        ext = ext.masked_fill(merged.bool(), NEG_INF)
        stay = torch.logaddexp(stay_pb, stay_pnb)  # [B, K]
        cand = torch.cat([stay, ext.reshape(B, K * C)], 1)  # [B, K + K*C]
        score, idx = cand.topk(K, dim=1)  # [B, K]
        is_ext = idx >= K
        src = torch.where(is_ext, (idx - K) // C, idx)  # [B, K] parent beam
        c = torch.where(is_ext, (idx - K) % C, -1)  # [B, K] emitted label

        def g(v: Tensor, src: Tensor = src) -> Tensor:
            return v.gather(1, src)  # [B, K]: the chosen parent beam's value

        new_pb = torch.where(is_ext, ninf, g(stay_pb))
        new_pnb = torch.where(is_ext, ext.reshape(B, K * C).gather(1, (idx - K).clamp(min=0)), g(stay_pnb))
        cc = c.clamp(min=0)
        new = {
            "pb": new_pb,
            "pnb": new_pnb,
            "last": torch.where(is_ext, c, g(last)),
            "plen": g(plen) + is_ext.long(),
            "h1": torch.where(is_ext, (g(h1) * _BASE + cc + 1) % _P1, g(h1)),
            "h2": torch.where(is_ext, (g(h2) * _BASE + cc + 1) % _P2, g(h2)),
            "parent_key": torch.where(is_ext, g(key), g(parent_key)),
        }
        dead = score == NEG_INF
        new["pb"] = new["pb"].masked_fill(dead, NEG_INF)
        new["pnb"] = new["pnb"].masked_fill(dead, NEG_INF)
        on = (t < lengths)[:, None]  # [B, 1]: frames past an utterance's end leave its beams as they are
        pb, pnb = torch.where(on, new["pb"], pb), torch.where(on, new["pnb"], pnb)
        last, plen = torch.where(on, new["last"], last), torch.where(on, new["plen"], plen)
        h1, h2 = torch.where(on, new["h1"], h1), torch.where(on, new["h2"], h2)
        parent_key = torch.where(on, new["parent_key"], parent_key)
        parents.append(torch.where(on, src, beams))
        emits.append(torch.where(on & ~dead, c, -1))

    final = torch.logaddexp(pb, pnb)  # [B, K]
    scores, order = final.topk(N, dim=1)  # [B, N]
    idx = order
    labels = torch.full((B, N, max(T, 1)), -1, dtype=torch.long, device=dev)  # [B, N, T]
    for t in range(T - 1, -1, -1):
        labels[:, :, t] = emits[t].gather(1, idx)
        idx = parents[t].gather(1, idx)
    keep = labels >= 0  # [B, N, T]
    out_len = keep.sum(-1)  # [B, N]
    out_len = torch.where(scores > NEG_INF, out_len, 0)
    L = max(int(out_len.max()) if out_len.numel() else 0, 1)
    ids = torch.zeros(B, N, L, dtype=torch.long, device=dev)
    pos = (keep.long().cumsum(-1) - 1).clamp(min=0)  # [B, N, T] target position of each kept label
    pos = torch.where(keep & (pos < L), pos, L)  # dropped labels go to a spill column
    spill = torch.zeros(B, N, L + 1, dtype=torch.long, device=dev)
    spill.scatter_(2, pos, labels.clamp(min=0))
    ids = spill[:, :, :L] * (torch.arange(L, device=dev) < out_len[..., None])
    return NBest(ids=ids, lengths=out_len, scores=scores)


def sequence_log_probs(
    log_probs: Tensor, lengths: Tensor, ids: Tensor, hyp_lengths: Tensor, blank: Optional[int] = None
) -> Tensor:
    """Differentiable log p(y | x) = -CTC(y) of N hypotheses per utterance.

    log_probs [B, T, C], lengths [B], ids [B, N, L], hyp_lengths [B, N] -> [B, N] fp32
    (-inf where y is infeasible, e.g. more labels than frames).
    """
    B, T, C = log_probs.shape
    N = ids.shape[1]
    blank = C - 1 if blank is None else int(blank)
    x = log_probs.float().transpose(0, 1)  # [T, B, C]
    x = x[:, :, None, :].expand(T, B, N, C).reshape(T, B * N, C)  # [T, B*N, C]
    nll = F.ctc_loss(
        x,
        ids.reshape(B * N, -1),
        lengths.repeat_interleave(N),
        hyp_lengths.reshape(-1),
        blank=blank,
        reduction="none",
        zero_infinity=False,
    )  # [B*N]
    return -nll.view(B, N)


def collapse_paths(paths: Tensor, lengths: Tensor, blank: int) -> Tuple[Tensor, Tensor]:
    """CTC collapse of frame-level paths: merge repeats, then drop blanks.

    paths [R, T] long, lengths [R] valid frames -> ids [R, L] (0-padded), label lengths [R].
    """
    R, T = paths.shape
    prev = F.pad(paths, (1, 0), value=-1)[:, :-1]  # [R, T] label at t-1
    keep = (paths != prev) & (paths != blank) & (torch.arange(T, device=paths.device) < lengths[:, None])
    out_len = keep.sum(1)  # [R]
    L = max(int(out_len.max()) if R else 0, 1)
    pos = torch.where(keep, keep.long().cumsum(1) - 1, L)  # [R, T]; dropped frames go to a spill column
    out = torch.zeros(R, L + 1, dtype=torch.long, device=paths.device).scatter_(1, pos, paths)
    return out[:, :L], out_len
