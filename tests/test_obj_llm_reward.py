"""``llm_reward``: REINFORCE with the LLM log-likelihood as reward.

The sampled estimator is unbiased (its mean over seeds against the exact gradient, every path enumerated on a
tiny case); the baseline lowers its variance (measured over seeds, asserted loosely); the N-best source gives the
exact gradient of the expected reward whatever the baseline; the gradient reaches the encoder and never the LLM;
SmolLM2 scores a fluent hypothesis above a disfluent one; config errors name the key.
"""

import dataclasses
import itertools

import pytest
import torch
from conftest import LLM_CORPUS
from hyp_common import (
    assert_config_error,
    assert_config_error_without_llm,
    assert_gradient_reaches_encoder_not_llm,
    make,
    steered,
)
from obj_tp_worker import asr_batch

from nemo_ctcllm.decoding.nbest import collapse_paths
from nemo_ctcllm.objectives.llm_reward import LlmReward
from nemo_ctcllm.objectives.shared.hypotheses import SearchSettings, hypotheses, llm_log_likelihood


@pytest.mark.parametrize("name", ["reward_sample", "reward_nbest"])
def test_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, name, llm_process_group):
    assert_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, name)


def reinforce_grads(model, ctx, leaf, baseline, seeds):
    """d loss / d posteriors [seeds, B*T*C] of llm_reward (sampled paths) for one seed each."""
    settings = SearchSettings(nbest=1, beam_size=1, lm_weight=0.0, acoustic_scale=1.0, llm_length_normalize=True)
    term = LlmReward("llm_reward", 1.0, 0, settings, "sample", 6, baseline, 0.0)
    grads = []
    for seed in seeds:
        term.generator = torch.Generator().manual_seed(seed)
        loss, _ = term(dataclasses.replace(ctx, cache={}))
        grads.append(torch.autograd.grad(loss, leaf, retain_graph=True)[0].flatten())
    return torch.stack(grads)


def test_reinforce_baseline_lowers_gradient_variance(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, llm_reward={})
    ctx, leaf = steered(model, strength=2.0, leaf=True)
    variance = {}
    for baseline in ("none", "batch_mean", "utterance_mean"):
        g = reinforce_grads(model, ctx, leaf, baseline, seeds=range(10))  # [S, P]
        variance[baseline] = g.var(0).sum().item()
    # rewards are LLM log-probs (all about -5): without a baseline every sample pushes the same way
    assert variance["utterance_mean"] < 0.5 * variance["none"], variance
    assert variance["batch_mean"] < 0.5 * variance["none"], variance


def test_nbest_reward_is_the_exact_expected_reward_gradient(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, llm_reward={"source": "nbest", "nbest": 5, "baseline": "none"})
    term = model.objectives["llm_reward"]
    ctx, leaf = steered(model, strength=3.0, leaf=True)
    grads = {}
    for baseline in ("none", "batch_mean", "utterance_mean"):
        term.baseline = baseline
        loss, stats = term(ctx)
        grads[baseline] = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
    hyps = hypotheses(ctx, term.settings)
    post = hyps.acoustic.log_softmax(1).exp()  # [B, N]
    expected = -(post * hyps.llm).sum() / post.shape[0]
    torch.testing.assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(stats["reward"], -expected.detach())
    (ref,) = torch.autograd.grad(expected, leaf)
    for baseline, g in grads.items():
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4, msg=baseline)


def exact_loss(term, ctx, theta, cols, lengths):
    """-1/B sum_b E_pi[r_b(collapse(pi))] by enumerating every path over ``cols`` (blank last) on each utterance's
    valid frames; theta [B, T, K] logits over those K symbols."""
    log_q = theta.log_softmax(-1)  # [B, T, K]
    expected = []
    for b, n in enumerate(lengths.tolist()):
        paths = torch.tensor(list(itertools.product(range(len(cols)), repeat=n)))  # [K^n, n]
        path_lp = log_q[b, torch.arange(n), paths].sum(1)  # [K^n]
        ids, id_len = collapse_paths(cols[paths], torch.full((len(paths),), n), blank=int(cols[-1]))
        texts = [ctx.env.tokenizer.ids_to_text(row[:k]) for row, k in zip(ids.tolist(), id_len.tolist())]
        llm = llm_log_likelihood(ctx.env.llm(), texts, term.settings.llm_length_normalize)[None]  # [1, K^n]
        row = dataclasses.replace(ctx, targets=ctx.targets[b : b + 1], target_len=ctx.target_len[b : b + 1])
        r = term.rewards(row, [texts], llm.to(theta))[0]  # [K^n]
        expected.append((path_lp.exp() * r).sum())
    return -torch.stack(expected).mean()


def test_sampled_gradient_is_unbiased(tokenizer_dir, tiny_llm, llm_process_group):
    """REINFORCE with sampled paths (the default: 4 paths per utterance, leave-one-out utterance-mean baseline)
    against the exact gradient of the expected reward, every path enumerated: 2 utterances of 3 and 2 frames over
    3 symbols (blank and two pieces; every other logit -inf), 27 + 9 paths, reward = LLM score - 0.5 word errors.

    Each call holds 16 copies of each utterance (16 x 4 paths, independent draws); the mean of 50 calls' gradients
    (seeds 0..49) must lie within 4 standard errors of the exact gradient in every component: a component misses
    with probability about 2e-4 (Student t, 49 degrees of freedom), 3e-3 for the 15 free components together
    (Bonferroni). The exact gradient is large against the standard error, so a biased estimator -- e.g. a
    baseline that includes the sample's own reward, which shrinks the gradient by (S - 1) / S = 3/4 -- fails."""
    copies, calls = 16, 50
    refs = LLM_CORPUS[:2]
    model = make(tokenizer_dir, tiny_llm, llm_reward={"error_weight": 0.5})
    term = model.objectives["llm_reward"]
    assert (term.source, term.num_samples, term.baseline) == ("sample", 4, "utterance_mean")
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, refs), compute_wer=False)
    C = ctx.log_probs.shape[2]
    cols = torch.tensor([*model.tokenizer.text_to_ids("the cat")[:2], C - 1])  # two pieces, then blank
    lengths = torch.tensor([3, 2])
    theta = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    log_probs = torch.full((2, 3, C), float("-inf"), dtype=torch.float64).index_copy(2, cols, theta.log_softmax(-1))
    ctx = dataclasses.replace(ctx, log_probs=log_probs, encoded_len=lengths, cache={})  # [B, T, C]
    (exact,) = torch.autograd.grad(exact_loss(term, ctx, theta, cols, lengths), theta)  # [B, T, 3]

    rows = torch.arange(2).repeat_interleave(copies)  # [B * copies]
    batch = asr_batch(model, [refs[i] for i in rows.tolist()])
    copied = dataclasses.replace(
        ctx, log_probs=log_probs[rows], encoded_len=lengths[rows], targets=batch[2], target_len=batch[3], cache={}
    )
    estimates = []
    for seed in range(calls):
        term.generator = torch.Generator().manual_seed(seed)
        loss, _ = term(copied)
        estimates.append(torch.autograd.grad(loss, theta, retain_graph=True)[0])
    estimates = torch.stack(estimates)  # [calls, B, T, 3]
    mean, se = estimates.mean(0), estimates.std(0) / calls**0.5
    assert exact[1, 2].abs().max() == 0 and estimates[:, 1, 2].abs().max() == 0  # row 1's padding frame
    free = se > 0
    assert int(free.sum()) == 15, se
    z = (mean - exact)[free] / se[free]
    print(f"|z| max {z.abs().max():.2f}; |exact| / se max {(exact[free] / se[free]).abs().max():.1f}")
    assert z.abs().max() < 4.0, z
    assert (exact[free].abs() / 4 > 6 * se[free]).any()  # a 3/4-shrunk mean would be ~5 se off or more


def test_smollm2_prefers_the_fluent_hypothesis(tokenizer_dir, smollm2_dir, llm_process_group):
    from nemo_ctcllm.llm import LLMHost

    host = LLMHost(smollm2_dir, tp_size=1)
    pairs = [
        ("the cat sat on the mat", "the cat sat on the the mat"),
        ("she opened the door and walked in", "she opened door the and in walked"),
        ("a dog ran far away from the cat", "a dog ran far away from the"),
    ]  # truncated: EOS is scored
    for normalize in (False, True):
        fluent = llm_log_likelihood(host, [f for f, _ in pairs], normalize)
        disfluent = llm_log_likelihood(host, [d for _, d in pairs], normalize)
        assert (fluent > disfluent).all(), (normalize, fluent, disfluent)
    assert llm_log_likelihood(host, [""], False)[0] < 0  # an empty hypothesis is not free


W = "model.objectives.llm_reward"
BAD = [
    ({"lm_weight": 0.5}, f"{W}: unknown key(s) ['lm_weight']"),
    ({"source": "beam"}, f"{W}.source must be one of ['sample', 'nbest']"),
    ({"baseline": "ema"}, f"{W}.baseline must be one of ['none', 'batch_mean', 'utterance_mean']"),
    ({"num_samples": 1}, f"{W}.baseline 'utterance_mean' needs num_samples >= 2"),
    ({"num_samples": 0}, f"{W}.num_samples must be an integer in [1, 64]"),
    ({"error_weight": -0.1}, f"{W}.error_weight must be a finite number in [0.0, 100.0]"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(W)[-1][:50] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, tiny_llm, block, message):
    assert_config_error(tokenizer_dir, tiny_llm, "llm_reward", block, message)


def test_config_error_without_llm(tokenizer_dir):
    assert_config_error_without_llm(tokenizer_dir, "llm_reward")
