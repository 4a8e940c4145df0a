"""``llm_pseudo_label``: the LLM-ranked best hypothesis as a pseudo-label (regularizer and semi-supervised).

CTC / margin losses on the N-best and the confidence filter; the gradient reaches the encoder and never the
LLM; rows without a transcript reach only this objective (never a loss that needs a reference), and a
manifest mixing labelled and unlabelled lines trains through a real Lightning Trainer; config errors name
the key. Hygiene: the N-best comes from an un-augmented no-grad pass (SpecAugment's and dropout's draws do
not move it), the confidence is calibrated per token so that a threshold filters a known share of real
outputs of a (briefly trained) tiny model, and the acoustic ranker (greedy self-training) needs no LLM.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LLM_CORPUS, encoder_gradient, tiny_model_cfg
from gradcheck import assert_gradient_matches_finite_differences
from hyp_common import (
    assert_config_error,
    assert_config_error_without_llm,
    assert_gradient_reaches_encoder_not_llm,
    make,
    record,
    steered,
)
from obj_tp_worker import asr_batch

from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import compose_loss
from nemo_ctcllm.objectives.llm_pseudo_label import pseudo_label_confidence
from nemo_ctcllm.objectives.shared.hypotheses import clean_log_probs, hypotheses


def test_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, llm_process_group):
    assert_gradient_reaches_encoder_not_llm(tokenizer_dir, tiny_llm, "pseudo_label")


@pytest.mark.parametrize("ranker,source", [("llm", "clean"), ("acoustic", "train")])
def test_gradient_matches_finite_differences(tokenizer_dir, tiny_llm, ranker, source, llm_process_group):
    """d loss / d the training pass's final-head logits [B, T, V+1] against central differences along 3 random
    directions and the gradient's own, for both rankers and both passes the N-best can come from (the clean pass
    is a no-grad constant, computed once; with ``source: train`` the N-best is re-searched in every evaluation, on
    the perturbed posteriors, and the step leaves it unchanged). Loss ``both`` with a margin of 50 nats, so every
    hinge is active (the loss is smooth): the gradient reaches the posteriors through a_best (CTC and hinge) and
    through the other hypotheses' a_n (hinge). Float64 posteriors; ``sequence_log_probs`` computes the CTC
    scores in float32 (the loss is about 60), so the step (0.1) and the tolerances are sized for that. Nothing
    random: a fresh ``ctx.cache`` per evaluation (the N-best is cached per step). The leaf is the head's logits,
    before its log_softmax: torch's CTC backward returns the gradient through log_softmax (exp(lp) - occupancy),
    which is d/d log-probs only along directions that keep them normalised.

    Catches a ``.detach()`` on a_best (``a.gather``) or on the others' a_n in the hinge (``a_best - a``)."""
    block = {"nbest": 4, "loss": "both", "margin": 50.0, "ranker": ranker, "source": source}
    model = make(tokenizer_dir, tiny_llm, llm_pseudo_label=block)
    model.train()
    term = model.objectives["llm_pseudo_label"]
    ctx, _ = steered(model, texts=LLM_CORPUS[:3])
    logits = ctx.log_probs.detach().double().requires_grad_(True)  # [B, T, V+1]
    cache = {"clean_log_probs": clean_log_probs(ctx)} if source == "clean" else {}

    def loss_fn():
        return term(dataclasses.replace(ctx, log_probs=logits.log_softmax(-1), cache=dict(cache)))[0]

    assert_gradient_matches_finite_differences(loss_fn, {"logits": logits}, eps=0.1, atol=2e-4, rtol=2e-2)


def test_pseudo_label_losses(tokenizer_dir, tiny_llm, llm_process_group):
    model = make(tokenizer_dir, tiny_llm, llm_pseudo_label={"nbest": 4, "lm_weight": 1.0, "source": "train"})
    term = model.objectives["llm_pseudo_label"]
    ctx, _ = steered(model, strength=3.0)  # steered posteriors: rank them, not a fresh pass of the model
    hyps = hypotheses(ctx, term.settings, source="train")
    best = (hyps.acoustic.detach() + hyps.llm).argmax(1)  # [B]
    rows = torch.arange(len(best))
    ids, lens = hyps.ids[rows, best], hyps.lengths[rows, best]  # [B, L], [B]
    ctc = F.ctc_loss(
        ctx.log_probs.transpose(0, 1), ids, ctx.encoded_len, lens, blank=ctx.log_probs.shape[2] - 1, reduction="none"
    )  # [B]
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
    semi = {
        "llm_pseudo_label": {"nbest": 3, "labelled": False, "unlabelled": True},
        "interctc": {"blocks": [2], "weights": [0.3]},
        "llm_rescoring": {"nbest": 3},
        "llm_reward": {"num_samples": 2},
    }
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
    expected = model.loss(
        log_probs=ctx.log_probs[lab],
        targets=targets[lab],
        input_lengths=ctx.encoded_len[lab],
        target_lengths=target_len[lab],
    )
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
    assert encoder_gradient(model) > 0
    # without an objective that reads unlabelled rows, an empty target is an ordinary all-blank CTC target
    plain = make(tokenizer_dir, tiny_llm, llm_rescoring={"nbest": 2})
    assert not plain.semi_supervised
    ctx = plain.step_context((signal, signal_len, targets, target_len), compute_wer=False)
    assert ctx.labelled is None
    _, logs = compose_loss(plain.objectives, ctx, step=0, prefix="train")
    full = plain.loss(
        log_probs=ctx.log_probs, targets=targets, input_lengths=ctx.encoded_len, target_lengths=target_len
    )
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
    model = make(
        tokenizer_dir,
        tiny_llm,
        train_manifest=str(manifest),
        llm_pseudo_label={"nbest": 3, "labelled": True, "unlabelled": True},
    )
    model.cfg.train_ds.shuffle = False
    seen = {}
    for name, term in model.objectives.items():
        term.register_forward_pre_hook(lambda m, args, name=name: record(seen, name, args[0]))
    before = model.encoder.layers[0].feed_forward1.linear1.weight.detach().clone()
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
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
    ({"ranker": "greedy"}, f"{P}.ranker must be one of ['llm', 'acoustic']"),
    ({"source": "teacher"}, f"{P}.source must be one of ['train', 'clean']"),
    ({"confidence_temperature": 0}, f"{P}.confidence_temperature must be a finite number in (0.0, 1000.0]"),
    ({"confidence_length_normalize": 1}, f"{P}.confidence_length_normalize must be true or false"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(P)[-1][:50] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, tiny_llm, block, message):
    assert_config_error(tokenizer_dir, tiny_llm, "llm_pseudo_label", block, message)


def test_config_error_without_llm(tokenizer_dir):
    assert_config_error_without_llm(tokenizer_dir, "llm_pseudo_label")


# ---------------------------------------------------------------------------------------------- hygiene
AUGMENTED = {
    "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
    "freq_masks": 2,
    "time_masks": 4,
    "freq_width": 10,
    "time_width": 0.1,
}


def augmented_model(tokenizer_dir, checkpoint, **block):
    """The tiny model with SpecAugment, dither and dropout on, in training mode."""
    cfg = tiny_model_cfg(tokenizer_dir, llm_pseudo_label={"nbest": 4, **block})
    cfg.spec_augment = AUGMENTED
    cfg.preprocessor.dither = 1e-5
    cfg.encoder.update({"dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_att": 0.1})
    if checkpoint is not None:
        cfg.llm = {"checkpoint": checkpoint}
    torch.manual_seed(0)
    model = EncDecCTCLLMModelBPE(cfg)
    model.train()
    return model


def test_nbest_comes_from_an_unaugmented_pass(tokenizer_dir, tiny_llm, llm_process_group):
    model = augmented_model(tokenizer_dir, tiny_llm)
    term = model.objectives["llm_pseudo_label"]
    batch = asr_batch(model, LLM_CORPUS)
    modes = {name: m.training for name, m in model.named_modules()}
    runs = []
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in (1, 2):  # two draws of SpecAugment, dither and dropout, from the same weights and statistics
        model.load_state_dict(start)  # (a training pass updates BatchNorm's running statistics)
        torch.manual_seed(seed)
        ctx = model.step_context(batch, compute_wer=False)
        bn = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
        assert bn
        clean = hypotheses(ctx, term.settings, source="clean")
        train = hypotheses(ctx, term.settings, source="train")
        for k, v in model.state_dict().items():  # the clean pass runs BatchNorm on its statistics, never updates them
            if k in bn:
                assert torch.equal(v, bn[k]), k
        assert {name: m.training for name, m in model.named_modules()} == modes  # every mode restored
        assert clean.acoustic.requires_grad and not clean.teacher.requires_grad
        model.eval()  # the clean pass is the eval-mode pass of the same batch and weights
        with torch.no_grad():
            _, _, reference = model.encode(*batch[:2])  # [B, T, V+1]
        model.train()
        assert torch.equal(ctx.cache["clean_log_probs"], reference)
        runs.append((ctx, clean, train))
    (ctx1, clean1, train1), (ctx2, clean2, train2) = runs
    assert not torch.allclose(ctx1.log_probs, ctx2.log_probs)  # the training passes were augmented differently
    assert not torch.equal(train1.ids, train2.ids)  # ... which moves an N-best searched in them
    assert torch.equal(clean1.ids, clean2.ids) and clean1.texts == clean2.texts  # ... and not the clean one
    # (its scores move by the training pass's BatchNorm statistics update of this step: momentum 0.1, no more)
    torch.testing.assert_close(clean1.teacher, clean2.teacher, atol=0.05, rtol=0)
    model.eval()  # in eval mode there is one pass: the training pass is the clean one
    with torch.no_grad():
        ctx = model.step_context(batch, compute_wer=False)
    ref = hypotheses(ctx, term.settings, source="clean")
    torch.testing.assert_close(ref.acoustic, ref.teacher)
    # the student's scores are the augmented pass's: the loss is -log p_CTC(y* | augmented x) of the clean label
    model.train()
    loss, _ = term(ctx1)
    best = clean1.teacher_combined(term.settings, term.settings.lm_weight).argmax(1)  # [B]
    expected = -clean1.acoustic.gather(1, best[:, None]).mean()
    torch.testing.assert_close(loss, expected)


def test_acoustic_ranker_is_greedy_self_training_without_llm(tokenizer_dir):
    """ranker: acoustic needs no LLM; its label is the clean pass's top hypothesis."""
    model = augmented_model(tokenizer_dir, None, ranker="acoustic", labelled=False, unlabelled=True)
    term = model.objectives["llm_pseudo_label"]
    assert not term.tp_collective and model.semi_supervised
    signal, signal_len, targets, target_len = asr_batch(model, LLM_CORPUS)
    torch.manual_seed(3)
    ctx = model.step_context((signal, signal_len, targets, torch.zeros_like(target_len)), compute_wer=False)
    total, logs = compose_loss(model.objectives, ctx, step=0, prefix="train")
    hyps = hypotheses(ctx, term.settings, source="clean", with_llm=False)
    assert float(hyps.llm.abs().sum()) == 0.0
    top = hyps.teacher.argmax(1)  # [B]: exact log p_CTC of the clean pass (the search's pruned sums may differ)
    rows = torch.arange(4)
    ids, lens = hyps.ids[rows, top], hyps.lengths[rows, top]  # [B, L], [B]: the top acoustic hypothesis
    ctc = F.ctc_loss(
        ctx.log_probs.transpose(0, 1), ids, ctx.encoded_len, lens, blank=ctx.log_probs.shape[2] - 1, reduction="none"
    )  # [B]
    torch.testing.assert_close(logs["train/llm_pseudo_label"], ctc.mean().detach())
    assert "train/ctc_final" not in logs and "train/llm_pseudo_label_top_changed" not in logs
    total.backward()
    assert encoder_gradient(model) > 0


def test_confidence_per_token_by_hand():
    """A 19-token label 5 nats ahead of the runner-up: the sequence softmax calls it certain (0.99), per token
    (5 / 20 = 0.25 nats) it is not; a 1-token label with the same gap stays confident. Temperature divides."""
    rank = torch.tensor([[-40.0, -45.0, -46.0, float("-inf")], [-4.0, -9.0, -10.0, -11.0]])  # [B, N]
    lengths = torch.tensor([[19, 18, 20, 0], [1, 2, 2, 3]])  # [B, N]
    best = torch.tensor([0, 0])
    plain = pseudo_label_confidence(rank, lengths, best, temperature=1.0, length_normalize=False)
    per_token = pseudo_label_confidence(rank, lengths, best, temperature=1.0, length_normalize=True)
    hot = pseudo_label_confidence(rank, lengths, best, temperature=2.0, length_normalize=True)
    e = torch.tensor(1.0).exp
    torch.testing.assert_close(plain[0], 1 / (1 + e() ** -5 + e() ** -6))  # 0.991
    torch.testing.assert_close(per_token[0], 1 / (1 + e() ** -0.25 + e() ** -0.3))  # 0.38: the threshold can bite
    torch.testing.assert_close(per_token[1], 1 / (1 + e() ** -2.5 + e() ** -3 + e() ** -3.5))  # 0.87
    torch.testing.assert_close(hot[0], 1 / (1 + e() ** -0.125 + e() ** -0.15))


def test_the_threshold_keeps_the_rows_at_or_above_it(tokenizer_dir, tiny_llm, llm_process_group):
    """On the tiny model's outputs (steered towards the transcripts by 1 to 5 nats a frame, like a partly
    trained model) the confidence is the by-hand per-token posterior and a threshold at each row's keeps
    exactly the rows at or above it."""
    model = make(tokenizer_dir, tiny_llm, llm_pseudo_label={"nbest": 8, "source": "train"})
    term = model.objectives["llm_pseudo_label"]
    ctx, _ = steered(model, strength=[1.0, 2.0, 3.0, 5.0])
    hyps, best, confidence, _ = term.label(ctx)
    rank = (hyps.teacher + term.settings.lm_weight * hyps.llm).masked_fill(~hyps.valid, float("-inf"))
    rows = torch.arange(len(best))
    norm = hyps.lengths[rows, best].float() + 1.0
    torch.testing.assert_close(confidence, (rank / norm[:, None]).softmax(1)[rows, best])
    assert len(set(confidence.tolist())) == 4
    for k, threshold in enumerate(confidence.sort().values.tolist()):  # the k-th lowest: 4 - k rows stay
        share = (4 - k) / 4
        term.confidence_threshold = threshold
        loss, stats = term(ctx)
        keep = confidence >= term.confidence_threshold  # [B]
        assert float(stats["kept"]) == share == float(keep.float().mean())
        torch.testing.assert_close(loss, -hyps.acoustic[rows, best][keep].mean())
    term.confidence_temperature = 1e3  # a high temperature flattens it towards 1 / (valid hypotheses)
    _, _, flat, _ = term.label(ctx)
    torch.testing.assert_close(flat, 1.0 / hyps.valid.sum(1).float(), atol=0.02, rtol=0)
