"""Batched CTC prefix beam search (nemo_ctcllm.decoding.nbest) against brute-force enumeration of alignments.

With a beam at least as large as the number of possible prefixes the search is exact: its N best label
sequences and their log p(y | x) (logsumexp over every alignment that collapses to y) must equal those of
enumerating all C^T alignments. Also: the differentiable scores (-CTC) agree with the search, a pruned beam
gives lower bounds, padding frames and batch neighbours change nothing, and the path collapse.
"""

import itertools

import pytest
import torch

from nemo_ctcllm.decoding import collapse_paths, ctc_prefix_beam_search, sequence_log_probs


def collapse(path, blank):
    out, prev = [], None
    for c in path:
        if c != prev and c != blank:
            out.append(c)
        prev = c
    return tuple(out)


def brute_force(log_probs, T, blank):
    """log_probs [T', C] -> [(log p(y), y)] over all label sequences y, best first (enumerates C^T paths)."""
    C = log_probs.shape[1]
    paths = torch.tensor(list(itertools.product(range(C), repeat=T)))  # [C^T, T]
    path_lp = log_probs[torch.arange(T), paths].sum(1)  # [C^T]
    groups = {}
    for path, lp in zip(paths.tolist(), path_lp):
        groups.setdefault(collapse(path, blank), []).append(lp)
    scored = [(torch.stack(v).logsumexp(0).item(), y) for y, v in groups.items()]
    return sorted(scored, reverse=True)


def random_posteriors(B, T, C, seed, sharpness=2.0):
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(B, T, C, generator=g)).log_softmax(-1)  # [B, T, C]


@pytest.mark.parametrize("C,T,blank", [(3, 5, 2), (4, 4, 3), (3, 5, 0), (2, 5, 1), (4, 1, 3)])
def test_exact_beam_matches_brute_force(C, T, blank):
    B = 3
    lp = random_posteriors(B, T, C, seed=C * 10 + T)
    lengths = torch.tensor([T, max(T - 1, 1), max(T - 2, 1)])
    beam = sum((C - 1) ** k for k in range(T + 1))  # number of label sequences of length <= T: exact
    N = min(6, beam)
    nb = ctc_prefix_beam_search(lp, lengths, beam_size=beam, nbest=N, blank=blank)
    assert nb.ids.shape[:2] == (B, N) and nb.scores.shape == (B, N)
    for b in range(B):
        ref = brute_force(lp[b], int(lengths[b]), blank)[:N]
        got = [
            (nb.scores[b, n].item(), tuple(nb.ids[b, n, : nb.lengths[b, n]].tolist()))
            for n in range(N)
            if nb.valid[b, n]
        ]
        assert [y for _, y in got] == [y for _, y in ref]
        torch.testing.assert_close(
            torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in ref]), atol=1e-5, rtol=1e-5
        )
    if T == 1:  # only C-1 labels and the empty sequence exist
        assert nb.valid.all()


def test_differentiable_scores_equal_search_scores_and_prune_gives_lower_bounds():
    B, T, C = 4, 6, 4
    lp = random_posteriors(B, T, C, seed=1, sharpness=1.0).requires_grad_(True)
    lengths = torch.tensor([6, 5, 4, 6])
    exact = ctc_prefix_beam_search(lp, lengths, beam_size=400, nbest=5)
    seq = sequence_log_probs(lp, lengths, exact.ids, exact.lengths)  # [B, N]
    torch.testing.assert_close(seq.detach(), exact.scores, atol=1e-5, rtol=1e-5)
    seq.sum().backward()
    assert lp.grad.abs().sum() > 0 and torch.isfinite(lp.grad).all()
    # a narrow beam drops alignments: every score it reports is <= the hypothesis' true log p(y | x)
    pruned = ctc_prefix_beam_search(lp.detach(), lengths, beam_size=3, nbest=3)
    true = sequence_log_probs(lp.detach(), lengths, pruned.ids, pruned.lengths)
    assert (pruned.scores <= true + 1e-5).all()
    assert (pruned.scores[:, 0] > float("-inf")).all()


def test_batched_equals_one_utterance_at_a_time_and_ignores_padding():
    B, T, C = 3, 12, 9
    lp = random_posteriors(B, T, C, seed=2, sharpness=1.5)
    lengths = torch.tensor([12, 7, 9])
    junk = lp.clone()
    for b, n in enumerate(lengths.tolist()):
        junk[b, n:] = torch.randn(T - n, C).log_softmax(-1)  # padding frames must not matter
    nb = ctc_prefix_beam_search(junk, lengths, beam_size=8, nbest=4)
    for b, n in enumerate(lengths.tolist()):
        one = ctc_prefix_beam_search(lp[b : b + 1, :n], lengths[b : b + 1], beam_size=8, nbest=4)
        torch.testing.assert_close(nb.scores[b], one.scores[0])
        torch.testing.assert_close(nb.lengths[b], one.lengths[0])
        L = int(one.lengths.max())
        torch.testing.assert_close(nb.ids[b, :, :L], one.ids[0, :, :L])


def test_collapse_paths():
    blank = 3
    paths = torch.tensor([[0, 0, 3, 0, 1, 1, 3, 3], [3, 3, 3, 3, 3, 3, 3, 3], [2, 3, 2, 2, 1, 0, 0, 0]])
    lengths = torch.tensor([8, 8, 5])
    ids, n = collapse_paths(paths, lengths, blank)
    expected = [collapse(p[:k], blank) for p, k in zip(paths.tolist(), lengths.tolist())]
    assert [tuple(r[:k]) for r, k in zip(ids.tolist(), n.tolist())] == expected == [(0, 0, 1), (), (2, 2, 1)]


def test_fewer_prefixes_than_nbest_are_marked_invalid():
    lp = random_posteriors(2, 1, 3, seed=3)  # one frame, two labels: 3 label sequences exist
    nb = ctc_prefix_beam_search(lp, torch.tensor([1, 1]), beam_size=5, nbest=5)
    assert nb.valid.sum(1).tolist() == [3, 3]
    assert (nb.lengths[~nb.valid] == 0).all() and (nb.scores[~nb.valid] == float("-inf")).all()
    torch.testing.assert_close(nb.scores[:, :3].exp().sum(1), torch.ones(2))  # all the probability mass
    with pytest.raises(ValueError, match="nbest must be in"):
        ctc_prefix_beam_search(torch.zeros(1, 2, 3), torch.tensor([2]), beam_size=2, nbest=3)
