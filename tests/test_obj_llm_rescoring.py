"""``llm_rescoring``: MWER over the LLM-rescored CTC N-best.

The loss and its gradient equal the expected-word-error formula on the N-best; the gradient reaches the encoder
and never the LLM; ``every_n_steps``; the LLM scores under TP=2 equal TP=1 (torchrun, gloo); export drops every
hypothesis-side term; config errors name the key.
"""

import dataclasses
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_cfg
from hyp_common import (
    CONFIGS,
    assert_config_error,
    assert_config_error_without_llm,
    assert_gradient_reaches_encoder_not_llm,
    make,
    steered,
)
from hyp_tp_worker import hyp_texts
from obj_tp_worker import launch

from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import compose_loss
from nemo_ctcllm.objectives.shared.hypotheses import hypotheses, llm_log_likelihood, word_errors
from nemo_ctcllm.objectives.shared.tensors import transcripts


def test_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, llm_process_group):
    assert_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, "rescoring")


def test_rescoring_is_expected_word_errors_with_mean_baseline(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, llm_rescoring={"nbest": 6, "lm_weight": 0.3, "acoustic_scale": 0.5})
    term = model.objectives["llm_rescoring"]
    ctx, _ = steered(model, strength=3.0)
    loss, stats = term(ctx)
    hyps = hypotheses(ctx, term.settings)  # cached: the same tensors the loss used
    assert hyps.valid.all() and len({t for row in hyps.texts for t in row}) > 6
    errors, ref_words = word_errors(hyps.texts, transcripts(ctx))  # [B, N], [B]
    assert errors.std() > 0  # the steered N-best differ in word errors
    s = 0.5 * hyps.acoustic.detach() + 0.3 * hyps.llm  # [B, N]
    post = s.softmax(1)
    B = errors.shape[0]
    torch.testing.assert_close(loss.detach(), (post * (errors - errors.mean(1, keepdim=True))).sum() / B)
    torch.testing.assert_close(stats["expected_risk"], (post * errors).sum(1).mean())
    (grad,) = torch.autograd.grad(loss, hyps.acoustic)
    torch.testing.assert_close(grad, 0.5 * post * (errors - (post * errors).sum(1, keepdim=True)) / B)
    top, rescored = hyps.acoustic.detach().argmax(1), s.argmax(1)
    assert float(stats["top_changed"]) == pytest.approx((top != rescored).float().mean().item())
    rows = torch.arange(B)
    assert float(stats["wer_rescored_top"]) == pytest.approx((errors[rows, rescored].sum() / ref_words.sum()).item())


def test_every_n_steps(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, llm_rescoring={"nbest": 2, "every_n_steps": 3})
    model.train()
    ctx, _ = steered(model)
    for step, runs in [(0, True), (1, False), (2, False), (3, True)]:
        model._trainer = types.SimpleNamespace(global_step=step)
        _, logs = compose_loss(model.objectives, dataclasses.replace(ctx, cache={}), step=step, prefix="train")
        assert ("train/llm_rescoring" in logs) == ("train/llm_rescoring_expected_risk" in logs) == runs, step
    model.eval()  # validation (a context built in eval mode): every time
    _, logs = compose_loss(model.objectives, dataclasses.replace(ctx, cache={}, training=False), step=1, prefix="val")
    assert "val/llm_rescoring_expected_risk" in logs


def test_tp2_scores_match_tp1(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    if torch.cuda.is_available():
        pytest.skip("the worker runs gloo on CPU")
    host = make(tokenizer_dir, tiny_llm, llm_rescoring={}).llm  # TP=1 in this process
    worker = Path(__file__).resolve().parent / "hyp_tp_worker.py"
    results = launch("scores", tiny_llm, tmp_path, worker=worker)
    for rank, res in enumerate(results):
        assert res["texts"] == hyp_texts(rank)
        for key, normalize in (("summed", False), ("normalized", True)):
            torch.testing.assert_close(
                res[key],
                llm_log_likelihood(host, res["texts"], normalize),
                atol=1e-5,
                rtol=1e-5,
                msg=f"rank {rank} {key}",
            )


def test_export_drops_the_terms_and_restore_needs_no_llm(tokenizer_dir, tiny_llm, tmp_path, llm_process_group):
    from nemo.collections.asr.models import ASRModel

    moved = str(tmp_path / "llm_copy")
    shutil.copytree(tiny_llm, moved)
    model = make(
        tokenizer_dir,
        moved,
        **{k: v for c in CONFIGS.values() for k, v in c.items() if k != "llm_reward"},
        llm_reward={},
    )
    path = str(tmp_path / "train.nemo")
    model.save_to(path)
    shutil.rmtree(moved)
    restored = ASRModel.restore_from(path, map_location="cpu")
    assert set(restored.objectives) == {"ctc_final", "llm_rescoring", "llm_reward", "llm_pseudo_label"}
    assert strip_for_inference(restored)
    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(restored) == count(plain)


R = "model.objectives.llm_rescoring"
BAD = [
    ({"n_best": 4}, f"{R}: unknown key(s) ['n_best']"),
    ({"nbest": 0}, f"{R}.nbest must be an integer in [1, 64]"),
    ({"nbest": 8, "beam_size": 4}, f"{R}.beam_size must be an integer in [8, 256]"),
    ({"lm_weight": -1.0}, f"{R}.lm_weight must be a finite number in [0.0, 100.0]"),
    ({"acoustic_scale": 0}, f"{R}.acoustic_scale must be a finite number in (0.0, 100.0]"),
    ({"llm_length_normalize": "yes"}, f"{R}.llm_length_normalize must be true or false"),
    ({"every_n_steps": 0}, f"{R}.every_n_steps must be an integer >= 1"),
    ({"normalize_risk": 1}, f"{R}.normalize_risk must be true or false"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(R)[-1][:50] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, tiny_llm, block, message):
    assert_config_error(tokenizer_dir, tiny_llm, "llm_rescoring", block, message)


def test_config_error_without_llm(tokenizer_dir):
    assert_config_error_without_llm(tokenizer_dir, "llm_rescoring")


def test_llm_top_changed_on_a_manifest(tokenizer_dir, tiny_llm, demo_corpus, llm_process_group):
    """The tool behind docs/RESULTS.md's "how often the LLM changes the top hypothesis" runs on real audio."""
    from benchmarks.llm_top_changed import llm_top_changed

    model = make(tokenizer_dir, tiny_llm)
    stats = llm_top_changed(model, model.llm, demo_corpus["dev"], nbest=(2, 4), lm_weights=(0.0, 1.0), batch_size=4)
    assert set(stats) == {"n2_lm0.0", "n2_lm1.0", "n4_lm0.0", "n4_lm1.0"}
    for name, s in stats.items():
        assert s["utterances"] == 8 and 0.0 <= s["top_changed"] <= 1.0
        assert s["wer_oracle"] <= min(s["wer_acoustic_top"], s["wer_rescored_top"]), name
    for n in (2, 4):  # λ = 0: nothing changes
        assert stats[f"n{n}_lm0.0"]["top_changed"] == 0.0
        assert stats[f"n{n}_lm0.0"]["wer_rescored_top"] == stats[f"n{n}_lm0.0"]["wer_acoustic_top"]


def test_recipe_blocks_build_when_enabled(tokenizer_dir, tiny_llm):
    """The documented YAML blocks (off by default) are valid: enabled as written, they build."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "conformer_ctc_llm.yaml")
    blocks = {}
    for name in ("llm_rescoring", "llm_reward", "llm_pseudo_label"):
        block = recipe.model.objectives[name]
        assert block.enabled is False
        blocks[name] = {**OmegaConf.to_container(block), "enabled": True}
    model = make(tokenizer_dir, tiny_llm, **blocks)
    assert {"llm_rescoring", "llm_reward", "llm_pseudo_label"} <= set(model.objectives)


@pytest.mark.parametrize("name", ["rescoring", "pseudo_label"])
def test_batch_padding_changes_nothing(tokenizer_dir, tiny_llm, name, llm_process_group):
    """Each utterance's loss is its own: the batch loss is the mean of each utterance alone, padding frames cut."""
    model = make(tokenizer_dir, tiny_llm, **CONFIGS[name])
    term = model.objectives[next(iter(CONFIGS[name]))]
    ctx, _ = steered(model, strength=3.0)
    with torch.no_grad():
        batched, _ = term(ctx)
        alone = []
        for b, n in enumerate(ctx.encoded_len.tolist()):
            row = dataclasses.replace(
                ctx,
                log_probs=ctx.log_probs[b : b + 1, :n],
                encoded_len=ctx.encoded_len[b : b + 1],
                signal=ctx.signal[b : b + 1],
                signal_len=ctx.signal_len[b : b + 1],  # pseudo_label's clean pass
                targets=ctx.targets[b : b + 1],
                target_len=ctx.target_len[b : b + 1],
                cache={},
            )
            alone.append(term(row)[0])
    torch.testing.assert_close(batched, torch.stack(alone).mean(), atol=1e-4, rtol=1e-4)
