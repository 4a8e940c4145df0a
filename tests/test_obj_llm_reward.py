"""``llm_reward``: REINFORCE with the LLM log-likelihood as reward.

The baseline lowers the gradient variance of the sampled estimator (measured over seeds, asserted loosely);
the N-best source gives the exact gradient of the expected reward whatever the baseline; the gradient
reaches the encoder and never the LLM; SmolLM2 scores a fluent hypothesis above a disfluent one; config
errors name the key.
"""
import dataclasses

import pytest
import torch

from hyp_common import (
    assert_config_error,
    assert_config_error_without_llm,
    assert_gradient_reaches_encoder_not_llm,
    make,
    steered,
)

from nemo_ctcllm.objectives.shared.hypotheses import SearchSettings, hypotheses, llm_log_likelihood
from nemo_ctcllm.objectives.llm_reward import LlmReward


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


def test_smollm2_prefers_the_fluent_hypothesis(tokenizer_dir, smollm2_dir, llm_process_group):
    from nemo_ctcllm.llm import LLMHost

    host = LLMHost(smollm2_dir, tp_size=1)
    pairs = [("the cat sat on the mat", "the cat sat on the the mat"),
             ("she opened the door and walked in", "she opened door the and in walked"),
             ("a dog ran far away from the cat", "a dog ran far away from the")]  # truncated: EOS is scored
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
