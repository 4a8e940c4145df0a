"""The ASR-to-LM bridge: greedy CTC segmentation, pooled soft tokens, the piece map and the estimators.

Gradients are checked against finite differences (float64), their sign on a case where it is known, padding
invariance, and real tokenizer pairs where ASR pieces have no clean LM tokenization: NeMo's SentencePiece BPE
against the tiny LLaMA's word-level tokenizer (many pieces unknown) and against SmolLM2's byte-level BPE.
"""

import json
from pathlib import Path

import pytest
import torch

from nemo_ctcllm.objectives.shared.bridge import (
    PieceMap,
    asr_pieces,
    bridge,
    greedy_segments,
    piece_embedding_matrix,
    piece_token_ids,
    pool_segments,
    soft_embed,
)

V, E = 5, 3  # tiny ASR vocabulary (+ blank = index 5) and LM width
BLANK = V


def frames(path, lead: float = 4.0, seed: int = 0, dtype=torch.float64):
    """log-probs [1, T, V+1] whose argmax follows ``path`` (a list of class ids), random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, len(path), V + 1, generator=g, dtype=dtype)
    logits[0, torch.arange(len(path)), torch.tensor(path)] += lead
    return logits.log_softmax(-1)


def tiny_map(seed: int = 1, mappable=None, dtype=torch.float64) -> PieceMap:
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(V, E, generator=g, dtype=dtype)
    mappable = torch.ones(V, dtype=torch.bool) if mappable is None else torch.tensor(mappable)
    return PieceMap(matrix * mappable[:, None], mappable, torch.arange(V))


def test_segments_follow_the_ctc_merge_rule():
    # a a <b> a b b <b> | padding (argmax 2 there must not count)
    path = [0, 0, BLANK, 0, 1, 1, BLANK, 2, 2]
    seg, tokens, n = greedy_segments(frames(path), torch.tensor([7]))
    assert n.tolist() == [3] and tokens[0].tolist() == [0, 0, 1]
    assert seg[0].tolist() == [0, 0, -1, 1, 2, 2, -1, -1, -1]
    # unmappable token 1 is dropped, the remaining segments renumbered
    keep = torch.tensor([True, False, True, True, True])
    seg, tokens, n = greedy_segments(frames(path), torch.tensor([7]), keep=keep)
    assert n.tolist() == [2] and tokens[0, :2].tolist() == [0, 0] and seg[0].tolist() == [0, 0, -1, 1] + [-1] * 5


def test_pooled_distribution_agrees_with_the_greedy_transcript():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 20, V + 1).log_softmax(-1)
    lengths = torch.tensor([20, 13, 7])
    seg, tokens, n = greedy_segments(log_probs, lengths)
    q = pool_segments(log_probs, seg, tokens.shape[1])  # [B, N, V]
    for b in range(3):
        k = int(n[b])
        assert torch.equal(q[b, :k].argmax(-1), tokens[b, :k])
        torch.testing.assert_close(q[b, :k].sum(-1), torch.ones(k))
        assert q[b, k:].abs().sum() == 0
        # the segments' tokens are NeMo-style greedy decoding: collapse repeats, drop blanks
        best = log_probs[b, : lengths[b]].argmax(-1).tolist()
        greedy = [t for i, t in enumerate(best) if t != BLANK and (i == 0 or t != best[i - 1])]
        assert tokens[b, :k].tolist() == greedy


@pytest.mark.parametrize("estimator", ["expected", "gumbel"])
def test_gradient_matches_finite_differences(estimator):
    path = [0, 0, BLANK, 3, 1, 1, BLANK, 4, BLANK, 2]
    log_probs = frames(path).requires_grad_(True)
    lengths = torch.tensor([9])
    pmap = tiny_map()
    w = torch.randn(1, 4, E, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss_of(lp):
        soft = bridge(lp, lengths, pmap, estimator, tau=0.7, generator=torch.Generator().manual_seed(3))
        assert soft.lengths.tolist() == [4]
        return (soft.embeds * w).sum()

    loss_of(log_probs).backward()
    eps = 1e-6
    numeric = torch.zeros_like(log_probs)
    with torch.no_grad():
        for t in range(len(path)):
            for v in range(V + 1):
                plus, minus = log_probs.clone(), log_probs.clone()
                plus[0, t, v] += eps
                minus[0, t, v] -= eps
                numeric[0, t, v] = (loss_of(plus) - loss_of(minus)) / (2 * eps)
    torch.testing.assert_close(log_probs.grad, numeric, atol=1e-7, rtol=1e-5)
    assert log_probs.grad[0, :9, :V].abs().sum() > 0
    assert log_probs.grad[0, :, BLANK].abs().max() == 0  # blank is renormalised away
    assert log_probs.grad[0, 9].abs().max() == 0  # padding frame
    assert log_probs.grad[0, 2].abs().max() == 0 and log_probs.grad[0, 6].abs().max() == 0  # blank frames


def test_gradient_sign_moves_the_segment_towards_the_raised_piece():
    """d ||e_n - M[v]||^2 / d log p_t(v) = -2 p_t(v) ||e_n - M[v]||^2 / Z_n < 0 for every frame t of segment n."""
    path = [0, 0, 0, BLANK]
    pmap = tiny_map()
    for v in range(1, V):
        log_probs = frames(path, lead=5.0).requires_grad_(True)
        soft = bridge(log_probs, torch.tensor([4]), pmap, "expected")
        assert soft.lengths.tolist() == [1]
        (soft.embeds[0, 0] - pmap.matrix[v]).pow(2).sum().backward()
        assert (log_probs.grad[0, :3, v] < 0).all(), v


def test_straight_through_forward_is_the_greedy_embedding_with_the_expected_gradient():
    path = [1, BLANK, 3, 3, 0]
    pmap = tiny_map()
    w = torch.randn(1, 3, E, dtype=torch.float64)
    grads = {}
    for est in ("expected", "straight_through"):
        lp = frames(path, lead=5.0).requires_grad_(True)
        soft = bridge(lp, torch.tensor([5]), pmap, est)
        if est == "straight_through":
            torch.testing.assert_close(soft.embeds[0], pmap.matrix[[1, 3, 0]])
        (soft.embeds * w).sum().backward()  # linear in e: the same dL/de for both estimators
        grads[est] = lp.grad
    torch.testing.assert_close(grads["straight_through"], grads["expected"])


def test_gumbel_hard_rows_are_piece_embeddings_and_low_temperature_samples_q():
    q = torch.tensor([[[0.7, 0.2, 0.1, 0.0, 0.0]]], dtype=torch.float64).expand(1, 4000, V)
    pmap = tiny_map()
    hard = soft_embed(q, pmap.matrix, "gumbel", tau=0.5, hard=True, generator=torch.Generator().manual_seed(0))
    idx = torch.cdist(hard[0], pmap.matrix).argmin(-1)  # [N]
    torch.testing.assert_close(hard[0], pmap.matrix[idx])
    freq = torch.bincount(idx, minlength=V).double() / idx.numel()  # Gumbel-max: argmax ~ q
    torch.testing.assert_close(freq, q[0, 0], atol=0.03, rtol=0.0)


def test_padding_invariance():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 16, V + 1).log_softmax(-1)
    lengths = torch.tensor([16, 9, 5])
    noisy = log_probs.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = torch.randn(16 - n, V + 1).log_softmax(-1)  # padding: anything
    pmap = tiny_map(mappable=[True, True, False, True, True], dtype=torch.float32)
    batched = bridge(noisy, lengths, pmap, "expected")
    for b, n in enumerate(lengths.tolist()):
        alone = bridge(log_probs[b : b + 1, :n], lengths[b : b + 1], pmap, "expected")
        k = int(alone.lengths[0])
        assert int(batched.lengths[b]) == k
        torch.testing.assert_close(batched.embeds[b, :k], alone.embeds[0, :k])
        assert batched.embeds[b, k:].abs().sum() == 0 and batched.q[b, :k, 2].abs().max() == 0


# ---------------------------------------------------------------------------------------------- real tokenizer pairs
@pytest.fixture(scope="module")
def asr_tokenizer(tokenizer_dir):
    from nemo.collections.common.tokenizers import SentencePieceTokenizer

    return SentencePieceTokenizer(model_path=str(Path(tokenizer_dir) / "tokenizer.model"))


def test_wordlevel_lm_unknown_pieces_are_unmappable(asr_tokenizer, tiny_llm, llm_process_group):
    """The tiny LLaMA's tokenizer knows ~20 whole words: a lone '▁', '<unk>', sub-word pieces and characters it
    has never seen get no LM token and are excluded; whole words it knows map to exactly their embedding."""
    from nemo_ctcllm.llm import LLMHost

    host = LLMHost(tiny_llm, tp_size=1)
    pieces, special = asr_pieces(asr_tokenizer)
    assert pieces[0] == "<unk>" and special[0] and sum(special) == 1
    ids = piece_token_ids(pieces, special, host.tokenizer)
    by_piece = dict(zip(pieces, ids))
    assert by_piece["<unk>"] == [] and by_piece["\u2581"] == []  # whitespace only: no LM token
    assert by_piece["a"] == host.tokenizer("a", add_special_tokens=False)["input_ids"]  # the word "a"
    assert by_piece["\u2581t"] == [] and by_piece["he"] == []  # sub-word pieces: unknown words
    unk = host.tokenizer.unk_token_id
    assert all(unk not in x for x in ids)
    assert "'" in pieces and by_piece["'"] == []  # the word-level vocabulary has no apostrophe
    pmap = PieceMap.build(pieces, special, host.tokenizer, host.embed)
    assert pmap.mappable.tolist() == [bool(x) for x in ids] and 0 < int(pmap.mappable.sum()) < len(pieces) // 2
    a = pieces.index("a")
    torch.testing.assert_close(pmap.matrix[a], host.embed(torch.tensor([by_piece["a"]]))[0, 0].float())
    assert pmap.matrix[~pmap.mappable].abs().sum() == 0 and (pmap.first_token[~pmap.mappable] == -100).all()
    # through the bridge: a hypothesis "a ▁ <unk> '" keeps only "a"; q has no mass on excluded pieces
    path = [a, a, len(pieces), pieces.index("\u2581"), 0, pieces.index("'")]  # len(pieces): blank
    log_probs = torch.full((1, len(path), len(pieces) + 1), -8.0)
    log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    soft = bridge(log_probs.log_softmax(-1), torch.tensor([len(path)]), pmap, "expected")
    assert soft.lengths.tolist() == [1] and soft.tokens[0, 0] == a
    assert soft.q[0, 0, ~pmap.mappable].abs().max() == 0


def test_smollm2_byte_level_bpe_maps_every_piece_but_unk(asr_tokenizer, smollm2_dir):
    """Byte-level BPE tokenizes any string: '▁' becomes the LM's space token, apostrophes their own token, and
    word-initial pieces the 'Ġ'-prefixed tokens. The embedding rows are the mean of the pieces' LM tokens."""
    from transformers import AutoTokenizer

    lm = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    pieces, special = asr_pieces(asr_tokenizer)
    ids = piece_token_ids(pieces, special, lm)
    by_piece = dict(zip(pieces, ids))
    assert [p for p, x in by_piece.items() if not x] == ["<unk>"]
    assert lm.convert_ids_to_tokens(by_piece["\u2581"]) == ["\u0120"]  # 'Ġ', the space token
    assert lm.convert_ids_to_tokens(by_piece["'"]) == ["'"]
    assert lm.convert_ids_to_tokens(by_piece["\u2581t"]) == ["\u0120t"]
    multi = {p: x for p, x in by_piece.items() if len(x) > 1}
    assert len(multi) <= len(pieces) // 10, multi  # the mean-embedding approximation is rarely needed here
    table = torch.randn(len(lm), 4)
    matrix = piece_embedding_matrix(ids, lambda x: table[x])
    for v, x in enumerate(ids):
        torch.testing.assert_close(matrix[v], table[x].mean(0) if x else torch.zeros(4))
    print(json.dumps({"pieces": len(pieces), "multi_token": len(multi)}))
