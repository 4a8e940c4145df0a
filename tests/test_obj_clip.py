"""``clip``: pooled encoder output vs frozen-LLM transcript embedding, symmetric InfoNCE.

Gradient path, overfitting one batch, padding invariance of the pooled audio, duplicate transcripts, the
text cache, TP=2 (text side) and DP=2 (gathered negatives) vs one process (torchrun, gloo), export,
config errors.
"""

import dataclasses
import shutil

import pytest
import torch
from conftest import LLM_CORPUS, encoder_gradient, overfit, tiny_model_cfg
from obj_tp_worker import TEXTS, asr_batch, clip_inputs, launch, make_clip

from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError, compose_loss

KEY = "model.objectives.clip"


def make(tokenizer_dir, checkpoint, ctc_weight=1.0, **block):
    cfg = tiny_model_cfg(tokenizer_dir, clip={"dim": 16, **block})
    cfg.objectives.ctc_final.weight = ctc_weight
    cfg.llm = {"checkpoint": checkpoint}
    torch.manual_seed(0)
    return EncDecCTCLLMModelBPE(cfg)


def test_gradient_reaches_encoder_and_projections_not_llm(tokenizer_dir, tiny_llm, llm_process_group):
    """This term alone: ctc_final at weight 0 is evaluated and logged but adds nothing to the total."""
    model = make(tokenizer_dir, tiny_llm, ctc_weight=0.0, pool="attention")
    assert model.cfg.objectives.clip.llm_hidden_size == 64
    model.train()
    ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    total, logs = compose_loss(model.objectives, ctx, step=0, prefix="train")
    assert float(logs["train/clip_temperature"]) == pytest.approx(0.07)
    assert 0.0 <= float(logs["train/clip_acc"]) <= 1.0 and float(logs["train/clip"]) > 0
    assert "train/ctc_final" in logs
    torch.testing.assert_close(total.detach(), logs["train/clip"])  # the total is this term alone
    total.backward()
    term = model.objectives["clip"]
    names = {n for n, _ in term.named_parameters()}
    assert {"logit_scale", "attn_pool.query", "audio_proj.weight", "text_proj.weight"} <= names
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert encoder_gradient(model) > 0
    assert all(p.grad is None for p in model.llm.llm_parameters())


def test_overfits_one_batch(tokenizer_dir, tiny_llm, llm_process_group):
    """20 Adam steps on this objective alone lower it. The encoder runs once; its output is optimised as a free
    tensor with the projections (the encoder's gradient is checked above; re-running it is slow on CPU)."""
    model = make(tokenizer_dir, tiny_llm)
    model.train()
    term = model.objectives["clip"]
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    encoded = torch.nn.Parameter(ctx.encoded.clone())  # [B, D, T]
    ctx = dataclasses.replace(ctx, encoded=encoded)
    losses, stats = overfit(lambda: term(ctx), [encoded, *term.parameters()], steps=20, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(stats["acc"]) == 1.0


def test_gradient_matches_finite_differences(tokenizer_dir, tiny_llm, llm_process_group):
    """d loss / d encoder output [B, D, T] in float64 against central differences (torch.autograd.gradcheck) on
    3 utterances of 4, 3 and 2 frames, attention pooling with a non-zero query (so the pooling weights depend on
    the frames). The text side is a constant (the frozen LLM's features, no gradient)."""
    model = make(tokenizer_dir, tiny_llm, pool="attention")
    term = model.objectives["clip"].double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        term.attn_pool.query.copy_(torch.randn(term.attn_pool.query.shape, generator=g))
        ctx = model.step_context(asr_batch(model, LLM_CORPUS[:3]), compute_wer=False)
    lengths = torch.tensor([4, 3, 2])
    x = torch.randn(3, ctx.encoded.shape[1], 4, dtype=torch.float64, generator=g, requires_grad=True)  # [B, D, T]

    def loss_of(encoded):
        return term(dataclasses.replace(ctx, encoded=encoded, encoded_len=lengths))[0]

    assert torch.autograd.gradcheck(loss_of, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    (grad,) = torch.autograd.grad(loss_of(x), x)
    assert grad[2, :, :2].abs().min() > 0 and grad[2, :, 2:].abs().max() == 0  # valid frames only


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_pooled_audio_is_padding_invariant(tokenizer_dir, tiny_llm, pool, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, pool=pool)
    model.eval()
    term = model.objectives["clip"]
    if pool == "attention":
        torch.nn.init.normal_(term.attn_pool.query)  # not the (mean-pooling) zero init
    batch = asr_batch(model, LLM_CORPUS)
    with torch.no_grad():
        ctx = model.step_context(batch, compute_wer=False)
        x, lengths = ctx.encoded.clone(), ctx.encoded_len  # [B, D, T]
        for i, n in enumerate(lengths.tolist()):
            x[i, :, n:] = 1e3  # padding frames must not count
        batched = term.pooled_audio(x, lengths)  # [B, D]
        for i, n in enumerate(lengths.tolist()):
            alone = term.pooled_audio(ctx.encoded[i : i + 1, :, :n], lengths[i : i + 1])
            torch.testing.assert_close(alone[0], batched[i], atol=1e-6, rtol=1e-5)
        signal, signal_len, targets, target_len = batch  # end to end: utterance 2 through the encoder alone
        n, u = int(signal_len[2]), int(target_len[2])
        ctx2 = model.step_context((signal[2:3, :n], signal_len[2:3], targets[2:3, :u], target_len[2:3]), False)
        torch.testing.assert_close(
            term.pooled_audio(ctx2.encoded, ctx2.encoded_len)[0], batched[2], atol=1e-4, rtol=1e-4
        )


def test_duplicate_transcripts_are_not_negatives(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm)
    term, host = model.objectives["clip"], model.llm
    texts = ["hello world", "hello world"]
    loss, stats = term.contrastive(torch.randn(2, 32), term.text_features(host, texts), texts)
    assert float(loss) == 0.0 and float(stats["acc"]) == 1.0  # the only candidate left is the positive


def test_text_cache(tokenizer_dir, tiny_llm, llm_process_group, monkeypatch):
    model = make(tokenizer_dir, tiny_llm)
    term, host = model.objectives["clip"], model.llm
    cached = term.text_features(host, LLM_CORPUS[:3])
    assert sorted(term._text_cache) == sorted(LLM_CORPUS[:3]) and not any(k.startswith("_") for k in term.state_dict())
    torch.testing.assert_close(cached, host.pooled_hidden(LLM_CORPUS[:3]), atol=1e-5, rtol=1e-5)

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was called for cached transcripts")

    monkeypatch.setattr(host, "pooled_hidden", no_llm)
    torch.testing.assert_close(term.text_features(host, LLM_CORPUS[2::-1]), cached.flip(0))
    ctx = model.step_context(asr_batch(model, LLM_CORPUS[:3]), compute_wer=False)
    loss, _ = term(ctx)  # the step reads the cache only
    assert torch.isfinite(loss)


def test_tp2_and_dp2_match_one_process(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    if torch.cuda.is_available():
        pytest.skip("the worker runs gloo on CPU")
    host = make(tokenizer_dir, tiny_llm).llm  # TP=1 in this process
    results = launch("clip", tiny_llm, tmp_path)
    inputs = [clip_inputs(r) for r in range(2)]
    ref = make_clip(host.hidden_size, cache_text=False)
    # text side under TP=2: every rank gets its own rows; the cache holds the whole TP group's transcripts
    for res, (_, texts) in zip(results, inputs):
        feats = ref.text_features(host, texts)
        torch.testing.assert_close(res["A"]["feats"], feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["A_cached_feats"], feats, atol=1e-5, rtol=1e-5)
        assert res["A_cache"] == sorted({t for _, ts in inputs for t in ts})
        assert res["A_second_calls"] == 0
    # negatives from both ranks (TP=2 in phase A, TP=1 / DP=2 in phase B). With DDP's mean over ranks the loss
    # and parameter gradients equal one process on the concatenated batch; each rank's audio rows get N x that.
    x = torch.cat([p for p, _ in inputs]).requires_grad_(True)
    texts = [t for _, ts in inputs for t in ts]
    assert texts.count(TEXTS[2]) == 2  # a transcript on both ranks: masked as a negative across ranks
    loss, _ = ref.contrastive(x, ref.text_features(host, texts), texts)
    loss.backward()
    b = inputs[0][0].shape[0]
    for phase in ("A", "B"):
        torch.testing.assert_close(
            (results[0][phase]["loss"] + results[1][phase]["loss"]) / 2, loss.detach(), atol=1e-5, rtol=1e-5, msg=phase
        )
        for r, res in enumerate(results):
            torch.testing.assert_close(res[phase]["grad"], 2 * x.grad[r * b : (r + 1) * b], atol=1e-6, rtol=1e-4)
        for name, p in ref.named_parameters():
            mean = (results[0][phase]["params"][name] + results[1][phase]["params"][name]) / 2
            torch.testing.assert_close(mean, p.grad, atol=1e-6, rtol=1e-4, msg=f"{phase}: {name}")


def test_export_drops_clip_and_restore_needs_no_llm(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    from nemo.collections.asr.models import ASRModel

    moved = str(tmp_path / "llm_copy")
    shutil.copytree(tiny_llm, moved)
    model = make(tokenizer_dir, moved, pool="attention")
    path = str(tmp_path / "train.nemo")
    model.save_to(path)
    shutil.rmtree(moved)
    restored = ASRModel.restore_from(path, map_location="cpu")
    torch.testing.assert_close(restored.state_dict(), model.state_dict())
    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    assert strip_for_inference(restored)
    assert not any(k.startswith("objectives.") for k in restored.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(restored) == count(plain)


BAD = [
    ({"dims": 8}, f"{KEY}: unknown key(s) ['dims']"),
    ({"dim": 0}, f"{KEY}.dim must be an integer >= 1"),
    ({"pool": "max"}, f"{KEY}.pool must be one of ['mean', 'attention']"),
    ({"text_encoder": "minilm"}, f"{KEY}.text_encoder must be one of ['llm']"),
    ({"init_temperature": 0.0}, f"{KEY}.init_temperature must be a finite number in [0.01, 1.0]"),
    ({"cache_text": "yes"}, f"{KEY}.cache_text must be true or false"),
    ({}, "model.llm.checkpoint is not set"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(KEY)[-1][:40] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, block, message):
    cfg = tiny_model_cfg(tokenizer_dir, clip=block)
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)


def test_text_cache_is_bounded_oldest_first(tokenizer_dir, tiny_llm, llm_process_group):
    """text_cache_size: the cache never holds more transcripts than that; the oldest go first, and a step's own
    transcripts are read before any eviction (features equal to the uncached ones)."""
    model = make(tokenizer_dir, tiny_llm)
    term, host = model.objectives["clip"], model.llm
    term.text_cache_size = 2
    feats = term.text_features(host, LLM_CORPUS[:3])  # 3 new transcripts in one step, then trimmed to 2
    torch.testing.assert_close(feats, host.pooled_hidden(LLM_CORPUS[:3]), atol=1e-5, rtol=1e-5)
    assert list(term._text_cache) == sorted(LLM_CORPUS[:3])[1:]  # inserted sorted; the first one went
    term.text_features(host, [LLM_CORPUS[3]])
    assert list(term._text_cache) == [sorted(LLM_CORPUS[:3])[2], LLM_CORPUS[3]]
