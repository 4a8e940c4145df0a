"""``lang_contrastive``: the LLM-pooled soft CTC hypothesis vs the LLM-pooled reference, clip's InfoNCE.

Gradient path (encoder and projections, never the LLM), overfitting one batch, padding invariance of the pooled
hypothesis, TP=2 vs TP=1 (torchrun, gloo; the per-rank losses differ, so the gradient at the LLM output is
averaged over the TP group), export, config errors.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLM_CORPUS, encoder_gradient, overfit, tiny_model_cfg
from gradcheck import assert_gradient_matches_finite_differences, peaked_context
from obj_tp_worker import asr_batch, launch
from softtext_tp_worker import LANG_BATCH, lang_loss, make_lang, softtext_inputs

from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.objectives.lang_contrastive import pooled_soft_hidden
from nemo_ctcllm.objectives.shared.bridge import PieceMap, asr_pieces, bridge

KEY = "model.objectives.lang_contrastive"
WORKER = Path(__file__).resolve().parent / "softtext_tp_worker.py"


def make(tokenizer_dir, checkpoint, **block):
    cfg = tiny_model_cfg(tokenizer_dir, lang_contrastive={"dim": 16, **block})
    cfg.llm = {"checkpoint": checkpoint}
    torch.manual_seed(0)
    model = EncDecCTCLLMModelBPE(cfg)
    with torch.no_grad():  # a random CTC head predicts blank almost everywhere: make the hypotheses non-empty
        model.decoder.decoder_layers[0].bias[-1] -= 5.0
    return model


def test_gradient_reaches_encoder_and_projections_not_llm(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_bpe_llm)
    assert model.cfg.objectives.lang_contrastive.llm_hidden_size == 64
    model.train()
    ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    term = model.objectives["lang_contrastive"]
    loss, stats = term(ctx)
    assert float(stats["hyp_tokens"]) >= 2 and 0.0 <= float(stats["acc"]) <= 1.0 and float(loss) > 0
    loss.backward()
    assert {n for n, _ in term.named_parameters()} == {
        "logit_scale",
        "audio_proj.weight",
        "audio_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
    }
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert encoder_gradient(model) > 0
    assert model.decoder.decoder_layers[0].weight.grad.abs().sum() > 0  # through the CTC head's posteriors
    assert all(p.grad is None for p in model.llm.llm_parameters())


def test_gradient_matches_finite_differences(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    """d loss / d CTC log-probs [B, T, V+1] (the audio side; the text side is the frozen LLM's features, a
    constant) against central differences along 3 random directions and the gradient's own.

    The posteriors (float64, :func:`gradcheck.peaked_context`) go through the bridge and the LLM in float64; the
    pooled states are cast to float32 by the objective (``.float()``), so the projections and the InfoNCE run
    in float32 and the loss (about 1) carries float32 rounding: the step (3e-2) and the tolerances are sized
    for that. ``expected`` estimator, nothing random.

    Catches a ``.detach()`` on the soft embeddings the LLM reads (``pooled_soft_hidden``), on the pooled states
    (``forward``), and on either direction of the symmetric InfoNCE alone: the audio rows as queries
    (``a`` in ``logits_a2t``) or as keys (``a_all`` in ``logits_t2a``, shared/contrastive.py)."""
    model = make(tokenizer_dir, tiny_bpe_llm)
    model.train()
    term = model.objectives["lang_contrastive"]
    ctx, log_probs = peaked_context(model, tiny_bpe_llm)

    def loss_fn():
        return term(ctx)[0]

    assert_gradient_matches_finite_differences(loss_fn, {"log_probs": log_probs}, eps=3e-2, atol=5e-5, rtol=1e-2)


def test_overfits_one_batch(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    """20 Adam steps on the CTC head's logits (a free tensor) and the projections lower the loss and retrieve
    every reference from its hypothesis."""
    model = make(tokenizer_dir, tiny_bpe_llm)
    model.train()
    term = model.objectives["lang_contrastive"]
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    logits = torch.nn.Parameter(ctx.log_probs.clone())  # [B, T, V+1]
    losses, stats = overfit(
        lambda: term(dataclasses.replace(ctx, log_probs=logits.log_softmax(-1))),
        [logits, *term.parameters()],
        steps=20,
        lr=3e-2,
    )
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(stats["acc"]) == 1.0


def test_pooled_hypothesis_is_padding_invariant(tokenizer_dir, tiny_bpe_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_bpe_llm)
    host = model.llm
    pmap = PieceMap.build(*asr_pieces(model.tokenizer), host.tokenizer, host.embed)
    log_probs, lengths, _ = softtext_inputs(1, model.tokenizer.vocab_size)  # [3, 12, V+1]
    noisy = log_probs.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = torch.randn(12 - n, noisy.shape[2]).log_softmax(-1)
    with torch.no_grad():
        batched = pooled_soft_hidden(host, bridge(noisy, lengths, pmap))  # [B, H]
        for b, n in enumerate(lengths.tolist()):
            alone = pooled_soft_hidden(host, bridge(log_probs[b : b + 1, :n], lengths[b : b + 1], pmap))
            torch.testing.assert_close(alone[0], batched[b], atol=1e-5, rtol=1e-5)


def test_tp2_matches_tp1(tokenizer_dir, tiny_bpe_llm, tmp_path, llm_process_group):
    """Under TP=2 each rank's loss has its own rows as queries against both ranks' rows; with DDP's mean over
    ranks the result must be the one-process loss on the concatenated batch: mean of the ranks' losses = that
    loss, each rank's own posteriors get N x its gradient, parameter gradients average to its gradient."""
    if torch.cuda.is_available():
        pytest.skip("the worker runs gloo on CPU")
    model = make(tokenizer_dir, tiny_bpe_llm)
    host = model.llm
    pieces, special = asr_pieces(model.tokenizer)
    (tmp_path / "pieces.json").write_text(json.dumps([pieces, special]))
    results = launch("lang_contrastive", tiny_bpe_llm, tmp_path, worker=WORKER)
    pmap = PieceMap.build(pieces, special, host.tokenizer, host.embed)
    inputs = [softtext_inputs(r, len(pieces), b=LANG_BATCH) for r in range(2)]
    log_probs = torch.cat([lp for lp, _, _ in inputs]).requires_grad_(True)
    lengths = torch.cat([n for _, n, _ in inputs])
    texts = [t for _, _, ts in inputs for t in ts]
    ref = make_lang(host.hidden_size)
    loss = lang_loss(ref, host, pmap, log_probs, lengths, texts)
    loss.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, loss.detach(), atol=1e-5, rtol=1e-5)
    offset = 0
    for r, res in enumerate(results):
        rows = slice(offset, offset + inputs[r][0].shape[0])
        offset = rows.stop
        assert res["llm_grads"] == 0 and res["grad"].abs().sum() > 0
        torch.testing.assert_close(res["grad"], 2 * log_probs.grad[rows], atol=1e-6, rtol=1e-4, msg=f"rank {r}")
    for name, p in ref.named_parameters():
        mean = (results[0]["params"][name] + results[1]["params"][name]) / 2
        torch.testing.assert_close(mean, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_export_drops_it_and_restore_needs_no_llm(tokenizer_dir, tiny_bpe_llm, tmp_path, llm_process_group):
    from nemo.collections.asr.models import ASRModel

    moved = str(tmp_path / "llm_copy")
    shutil.copytree(tiny_bpe_llm, moved)
    model = make(tokenizer_dir, moved)
    path = str(tmp_path / "train.nemo")
    model.save_to(path)
    shutil.rmtree(moved)  # llm_hidden_size was written into the config: the .nemo builds without the LLM
    restored = ASRModel.restore_from(path, map_location="cpu")
    torch.testing.assert_close(restored.state_dict(), model.state_dict())
    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    assert strip_for_inference(restored)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(restored) == count(plain) and set(restored.state_dict()) == set(plain.state_dict())


BAD = [
    ({"pool": "mean"}, f"{KEY}: unknown key(s) ['pool']"),
    ({"dim": 0}, f"{KEY}.dim must be an integer >= 1"),
    ({"estimator": "soft"}, f"{KEY}.estimator must be one of ['expected', 'straight_through', 'gumbel']"),
    ({"head_block": 3}, f"{KEY}.head_block must be null (the final CTC head) or one of the interctc blocks []"),
    ({"init_temperature": 2.0}, f"{KEY}.init_temperature must be a finite number in [0.01, 1.0]"),
    ({"cache_text": 1}, f"{KEY}.cache_text must be true or false"),
    ({}, "model.llm.checkpoint is not set"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(KEY)[-1][:40] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, block, message):
    cfg = tiny_model_cfg(tokenizer_dir, lang_contrastive=block)
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)
