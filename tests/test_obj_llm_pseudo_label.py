"""``llm_pseudo_label``: the LLM-ranked best hypothesis as a pseudo-label (regularizer and semi-supervised).

CTC / margin losses on the N-best and the confidence filter; the gradient reaches the encoder and never the
LLM; rows without a transcript reach only this objective (never a loss that needs a reference), and a
manifest mixing labelled and unlabelled lines trains through a real Lightning Trainer; config errors name
the key.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LLM_CORPUS, make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hyp_common import (  # noqa: E402
    assert_config_error,
    assert_config_error_without_llm,
    assert_gradient_reaches_encoder_not_llm,
    make,
    record,
    steered,
)
from obj_tp_worker import asr_batch  # noqa: E402

from nemo_ctcllm.objectives import compose_loss  # noqa: E402
from nemo_ctcllm.objectives.shared.hypotheses import hypotheses  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", num_key_value_heads=2))



def test_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, llm_process_group):
    assert_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, "pseudo_label")


def test_pseudo_label_losses(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, llm_pseudo_label={"nbest": 4, "lm_weight": 1.0})
    term = model.objectives["llm_pseudo_label"]
    ctx, _ = steered(model, strength=3.0)
    hyps = hypotheses(ctx, term.settings)
    best = (hyps.acoustic.detach() + hyps.llm).argmax(1)  # [B]
    rows = torch.arange(len(best))
    ids, lens = hyps.ids[rows, best], hyps.lengths[rows, best]  # [B, L], [B]
    ctc = F.ctc_loss(ctx.log_probs.transpose(0, 1), ids, ctx.encoded_len, lens, blank=ctx.log_probs.shape[2] - 1,
                     reduction="none")  # [B]
    loss, stats = term(ctx)
    torch.testing.assert_close(loss, ctc.mean())
    assert float(stats["kept"]) == 1.0
    term.loss, term.margin = "margin", 1e6  # every hinge active: mean_n (m - a_best + a_n) over the others
    margin, _ = term(ctx)
    a = hyps.acoustic.detach()
    others = torch.ones_like(a, dtype=torch.bool).scatter(1, best[:, None], False)
    hinge = ((1e6 - a[rows, best][:, None] + a) * others).sum(1) / 3
    torch.testing.assert_close(margin, hinge.mean())
    term.loss, term.confidence_threshold = "ctc", 1.0  # no hypothesis is that sure: nothing is kept
    loss, stats = term(ctx)
    assert float(loss) == 0.0 and float(stats["kept"]) == 0.0
    loss.backward()  # still a graph


def test_rows_without_a_transcript_reach_only_llm_pseudo_label(tokenizer_dir, tiny_llm, llm_process_group):
    semi = {"llm_pseudo_label": {"nbest": 3, "labelled": False, "unlabelled": True},
            "interctc": {"blocks": [2], "weights": [0.3]}, "llm_rescoring": {"nbest": 3},
            "llm_reward": {"num_samples": 2}}
    model = make(tokenizer_dir, tiny_llm, **semi)
    assert model.semi_supervised
    signal, signal_len, targets, target_len = asr_batch(model, LLM_CORPUS)
    target_len = target_len.clone()
    target_len[[1, 3]] = 0  # rows 1 and 3: manifest lines without `text`
    seen = {}
    for name, term in model.objectives.items():
        term.register_forward_pre_hook(lambda m, args, name=name: record(seen, name, args[0]))
    ctx = model.step_context((signal, signal_len, targets, target_len), compute_wer=False)
    total, logs = compose_loss(model.objectives, ctx, step=0, prefix="train")
    for name in ("ctc_final", "interctc_l2", "llm_rescoring", "llm_reward"):
        assert seen[name][0].tolist() == target_len[[0, 2]].tolist(), name
    assert seen["llm_pseudo_label"][0].tolist() == target_len.tolist()
    assert float(logs["train/labelled_rows"]) == 2 and float(logs["train/llm_pseudo_label_kept"]) == 0.5
    lab = [0, 2]
    expected = model.loss(log_probs=ctx.log_probs[lab], targets=targets[lab], input_lengths=ctx.encoded_len[lab],
                          target_lengths=target_len[lab])
    torch.testing.assert_close(logs["train/ctc_final"], expected.detach())
    total.backward()
    # a batch of unlabelled rows only: the reference-needing terms are skipped, the total still trains
    model.zero_grad()
    ctx = model.step_context((signal, signal_len, targets, torch.zeros_like(target_len)), compute_wer=False)
    total, logs = compose_loss(model.objectives, ctx, step=0, prefix="train")
    assert not {"train/ctc_final", "train/interctc_l2", "train/llm_rescoring", "train/llm_reward"} & set(logs)
    assert "train/llm_pseudo_label" in logs
    assert [len(t) for t in seen["llm_reward"]] == [2, 0]  # called on no row: it joins the LLM's TP collectives
    total.backward()
    assert model.encoder.layers[0].feed_forward1.linear1.weight.grad.abs().sum() > 0
    # without an objective that reads unlabelled rows, an empty target is an ordinary all-blank CTC target
    plain = make(tokenizer_dir, tiny_llm, llm_rescoring={"nbest": 2})
    assert not plain.semi_supervised
    ctx = plain.step_context((signal, signal_len, targets, target_len), compute_wer=False)
    assert ctx.labelled is None
    _, logs = compose_loss(plain.objectives, ctx, step=0, prefix="train")
    full = plain.loss(log_probs=ctx.log_probs, targets=targets, input_lengths=ctx.encoded_len,
                      target_lengths=target_len)
    torch.testing.assert_close(logs["train/ctc_final"], full.detach())


def test_mixed_manifest_trains_with_lightning(tokenizer_dir, tiny_llm, demo_corpus, tmp_path, llm_process_group):
    """A manifest whose odd lines have no `text` trains through a real Trainer and real dataloader batches."""
    from lightning.pytorch import Trainer

    lines = [json.loads(x) for x in Path(demo_corpus["train"]).read_text().splitlines() if x.strip()][:12]
    for i, entry in enumerate(lines):
        entry["audio_filepath"] = str(Path(demo_corpus["train"]).parent / entry["audio_filepath"])
        if i % 2:
            del entry["text"]
    manifest = tmp_path / "mixed.json"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in lines))
    model = make(tokenizer_dir, tiny_llm, train_manifest=str(manifest),
                 llm_pseudo_label={"nbest": 3, "labelled": True, "unlabelled": True})
    model.cfg.train_ds.shuffle = False
    seen = {}
    for name, term in model.objectives.items():
        term.register_forward_pre_hook(lambda m, args, name=name: record(seen, name, args[0]))
    before = model.encoder.layers[0].feed_forward1.linear1.weight.detach().clone()
    trainer = Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    model.set_trainer(trainer)
    trainer.fit(model)
    assert trainer.global_step == 3
    ctc, pl = torch.cat(seen["ctc_final"]), torch.cat(seen["llm_pseudo_label"])
    assert (ctc > 0).all() and len(ctc) == 6  # 3 batches of 4, half labelled
    assert (pl == 0).sum() == 6 and len(pl) == 12
    assert not torch.equal(before, model.encoder.layers[0].feed_forward1.linear1.weight)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


P = "model.objectives.llm_pseudo_label"
BAD = [
    ({"loss": "mmi"}, f"{P}.loss must be one of ['ctc', 'margin', 'both']"),
    ({"confidence_threshold": 1.5}, f"{P}.confidence_threshold must be a finite number in [0.0, 1.0]"),
    ({"margin": -1}, f"{P}.margin must be a finite number in [0.0, 1000.0]"),
    ({"labelled": False}, f"{P}: labelled and unlabelled are both false"),
    ({"unlabelled": "true"}, f"{P}.unlabelled must be true or false"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(P)[-1][:50] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, tiny_llm, block, message):
    assert_config_error(tokenizer_dir, tiny_llm, "llm_pseudo_label", block, message)


def test_config_error_without_llm(tokenizer_dir):
    assert_config_error_without_llm(tokenizer_dir, "llm_pseudo_label")
