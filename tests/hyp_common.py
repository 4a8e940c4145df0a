"""Helpers shared by the tests of the hypothesis-side objectives (llm_rescoring, llm_reward, llm_pseudo_label).

Posteriors: an untrained tiny model's N-best are all-wrong hypotheses with the same word errors, so the tests
add a constant bias towards the transcript's tokens (:func:`steered`) -- like a partly trained model; the graph
to the encoder is kept.
"""

import dataclasses

import pytest
import torch
from conftest import LLM_CORPUS, encoder_gradient, tiny_model_cfg
from obj_tp_worker import asr_batch

from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError, compose_loss

CONFIGS = {
    "rescoring": {"llm_rescoring": {"nbest": 4, "beam_size": 6}},
    "reward_sample": {"llm_reward": {"num_samples": 4, "error_weight": 0.5}},
    "reward_nbest": {"llm_reward": {"source": "nbest", "nbest": 4}},
    "pseudo_label": {"llm_pseudo_label": {"nbest": 4, "loss": "both"}},
}


def make(tokenizer_dir, checkpoint, train_manifest=None, **objectives):
    cfg = tiny_model_cfg(tokenizer_dir, train_manifest=train_manifest, **objectives)
    cfg.llm = {"checkpoint": checkpoint}
    torch.manual_seed(0)
    return EncDecCTCLLMModelBPE(cfg)


def steered(model, texts=LLM_CORPUS, strength=5.0, leaf=False):
    """StepContext whose posteriors are biased (by a constant, or one per row) towards each transcript's tokens,
    spread evenly over the utterance. ``leaf``: posteriors as a free leaf tensor instead of the encoder's output."""
    ctx = model.step_context(asr_batch(model, texts), compute_wer=False)
    B, T, C = ctx.log_probs.shape
    bias = torch.zeros(B, T, C)
    for b, (u, n) in enumerate(zip(ctx.target_len.tolist(), ctx.encoded_len.tolist())):
        frames = torch.linspace(0, n - 1, u + 2)[1:-1].round().long()
        bias[b, frames, ctx.targets[b, :u]] = strength[b] if isinstance(strength, (list, tuple)) else strength
    log_probs = ctx.log_probs.detach().requires_grad_(True) if leaf else ctx.log_probs
    return dataclasses.replace(ctx, log_probs=(log_probs + bias).log_softmax(-1), cache={}), log_probs


def record(seen, name, ctx):
    """Forward pre-hook body: note the target lengths of the rows an objective was handed."""
    seen.setdefault(name, []).append(ctx.target_len.clone())


def assert_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, name):
    """One training step of CONFIGS[name] alone (ctc_final at weight 0, so only this term can feed the encoder):
    the encoder gets a gradient, the (frozen) LLM none."""
    model = make(tokenizer_dir, tiny_llm, ctc_final={"weight": 0.0}, **CONFIGS[name])
    model.train()
    ctx, _ = steered(model)
    weighted = {}
    total, logs = compose_loss(model.objectives, ctx, step=0, prefix="train", weighted=weighted)
    term = next(iter(CONFIGS[name]))
    assert torch.isfinite(logs[f"train/{term}"]) and logs[f"train/{term}"].requires_grad is False
    # the term's own weighted loss (total is in the graph anyway: it holds ctc_final as 0 * loss)
    assert weighted[term].requires_grad, f"{term}: no gradient path from its loss"
    total.backward()
    assert encoder_gradient(model) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.llm.llm_parameters())
    assert not any(True for _ in model.objectives[term].parameters())  # nothing of its own to train or export


def assert_config_error(tokenizer_dir, tiny_llm, name, block, message):
    cfg = tiny_model_cfg(tokenizer_dir, **{name: block})
    cfg.llm = {"checkpoint": tiny_llm}
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)


def assert_config_error_without_llm(tokenizer_dir, name):
    with pytest.raises(
        ConfigError,
        match=f"model.objectives.{name} scores hypotheses with the LLM, but model.llm.checkpoint is not set",
    ):
        EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir, **{name: {}}))
