"""``mlm``: a masked LM predicts masked tokens of the soft CTC transcription (KL to the CTC posteriors).

Tiny random masked LMs built from configs (no hub): BERT with the byte-level BPE of ``scripts/train_mlm.py``,
and DistilBERT with a WordPiece tokenizer (any ``AutoModelForMaskedLM`` folder). Gradient path (encoder, final
or intermediate head; never a frozen MLM), fine-tuning, overfitting one batch, padding invariance, export,
config errors, and the training script end to end on a tiny budget.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLM_CORPUS, REPO, encoder_gradient, overfit, tiny_model_cfg
from gradcheck import assert_gradient_matches_finite_differences, peaked_context
from obj_tp_worker import asr_batch

from nemo_ctcllm.data.small_lm import PIECE_OFFSET, bert_mlm, read_sentences, train_byte_level_bpe
from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.objectives.mlm import draw_mask, load_mlm, mlm_soft_label_loss
from nemo_ctcllm.objectives.shared.bridge import PieceMap, asr_pieces, bridge

KEY = "model.objectives.mlm"
SENTENCES = read_sentences(REPO / "demo" / "sentences.txt")[:3000]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlm") / "bert_bpe"
    tok = train_byte_level_bpe(SENTENCES, 320)
    torch.manual_seed(0)
    bert_mlm(tok, hidden=32, layers=1, heads=2, max_len=40).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory):
    """DistilBERT + a WordPiece tokenizer ([CLS]/[SEP]/[MASK], ``##`` continuations, unknown characters)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForMaskedLM

    folder = tmp_path_factory.mktemp("mlm") / "distilbert_wp"
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(
        SENTENCES,
        trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
        ),
    )
    tok = BertTokenizerFast(
        tokenizer_object=wp,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=len(tok),
        dim=32,
        hidden_dim=64,
        n_layers=1,
        n_heads=2,
        max_position_embeddings=40,
        pad_token_id=tok.pad_token_id,
    )
    DistilBertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make(tokenizer_dir, model_dir, interctc=None, **block):
    objectives = {"mlm": {"model_dir": model_dir, "mask_prob": 0.3, **block}}
    if interctc:
        objectives["interctc"] = {"blocks": [interctc], "weights": [0.5]}
    torch.manual_seed(0)
    model = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir, **objectives))
    heads = [model.decoder] + ([model.objectives[f"interctc_l{interctc}"].decoder] if interctc else [])
    with torch.no_grad():  # a random CTC head predicts blank almost everywhere: make the hypotheses non-empty
        for head in heads:
            head.decoder_layers[0].bias[-1] -= 5.0
    return model


@pytest.mark.parametrize("head,estimator", [(None, "expected"), (2, "straight_through")])
def test_gradient_reaches_encoder_never_the_frozen_mlm(tokenizer_dir, tiny_bert, head, estimator):
    model = make(tokenizer_dir, tiny_bert, interctc=head, head_block=head, estimator=estimator)
    model.train()
    term = model.objectives["mlm"]
    ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    torch.manual_seed(1)
    loss, stats = term(ctx)
    assert float(stats["masked"]) >= 4 and 0.0 <= float(stats["acc"]) <= 1.0 and 0.0 < float(loss) < 20
    loss.backward()
    assert encoder_gradient(model) > 0
    if head:
        assert model.objectives[f"interctc_l{head}"].decoder.decoder_layers[0].weight.grad.abs().sum() > 0
        assert model.decoder.decoder_layers[0].weight.grad is None
    mlm, _ = term.masked_lm("cpu")
    assert all(p.grad is None and not p.requires_grad for p in mlm.parameters()) and not mlm.training
    assert list(term.parameters()) == [] and term.state_dict() == {}  # frozen MLM: not in the module tree


def test_gradient_matches_finite_differences(tokenizer_dir, tiny_bert):
    """d loss / d CTC log-probs [B, T, V+1] against central differences along 3 random directions and the
    gradient's own. The loss reaches the posteriors by two paths: the pooled q of each masked position (the KL's
    first argument) and the soft embeddings of the unmasked positions, which the MLM reads to predict them.

    Float64 posteriors, bridge and (frozen, eval-mode: no dropout) MLM; the objective casts the MLM's scores to
    float32, so the step (3e-2) and the tolerances are sized for float32 rounding. The mask is drawn from the
    global RNG: re-seeded before every evaluation.

    Catches a ``.detach()`` on ``soft.q`` (the KL's q) in ``mlm_soft_label_loss``. It does NOT catch one on
    ``soft.embeds`` (the MLM's input): the tiny random MLM barely reads its input, so that path's share of the
    gradient is below the float32 tolerance (checked by hand: the test passes with that cut)."""
    model = make(tokenizer_dir, tiny_bert)
    model.train()
    term = model.objectives["mlm"]
    term.masked_lm("cpu")[0].double()  # the frozen MLM, loaded on first use and kept
    ctx, log_probs = peaked_context(model)

    def loss_fn():
        torch.manual_seed(0)  # the same mask
        return term(ctx)[0]

    assert_gradient_matches_finite_differences(loss_fn, {"log_probs": log_probs}, eps=3e-2, atol=1e-4, rtol=1e-2)


def test_finetune_trains_the_mlm_and_export_drops_it(tokenizer_dir, tiny_bert, tmp_path):
    from nemo.collections.asr.models import ASRModel

    model = make(tokenizer_dir, tiny_bert, finetune=True)
    model.train()
    term = model.objectives["mlm"]
    ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    loss, _ = term(ctx)
    loss.backward()
    trained = {n: p for n, p in term.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for p in trained.values())
    assert not term.mlm.get_input_embeddings().weight.requires_grad  # the piece map is built from it
    assert any(k.startswith("mlm.") for k in term.state_dict())
    path = str(tmp_path / "train.nemo")
    model.save_to(path)
    restored = ASRModel.restore_from(path, map_location="cpu")
    torch.testing.assert_close(restored.state_dict(), model.state_dict())
    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    assert strip_for_inference(restored)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(restored) == count(plain) and set(restored.state_dict()) == set(plain.state_dict())


def test_frozen_export_param_count(tokenizer_dir, tiny_bert):
    model = make(tokenizer_dir, tiny_bert)
    plain = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(plain)  # nothing trainable is added; the MLM lives outside the module tree
    assert strip_for_inference(model) and count(model) == count(plain)


def test_overfits_one_batch(tokenizer_dir, tiny_bert):
    """20 Adam steps on the final head's logits (a free tensor) and the fine-tuned MLM, the same masks every
    step: the MLM's divergence from the soft transcription drops."""
    model = make(tokenizer_dir, tiny_bert, finetune=True)
    model.train()
    term = model.objectives["mlm"]
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, LLM_CORPUS), compute_wer=False)
    logits = torch.nn.Parameter(ctx.log_probs.clone())  # [B, T, V+1]

    def step():
        torch.manual_seed(0)  # the same masks
        return term(dataclasses.replace(ctx, log_probs=logits.log_softmax(-1)))

    trainable = [p for p in term.parameters() if p.requires_grad]
    losses, stats = overfit(step, [logits, *trainable], steps=20, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("folder", ["tiny_bert", "tiny_distilbert"])
def test_padding_invariance_and_any_masked_lm_folder(tokenizer_dir, folder, request):
    """The batch loss is the mean over masked positions of the utterances' own; BERT and DistilBERT both work."""
    from nemo.collections.common.tokenizers import SentencePieceTokenizer
    from softtext_tp_worker import softtext_inputs

    mlm, tok = load_mlm(request.getfixturevalue(folder))
    mlm.eval()
    asr = SentencePieceTokenizer(model_path=str(Path(tokenizer_dir) / "tokenizer.model"))
    emb = mlm.get_input_embeddings()
    pmap = PieceMap.build(*asr_pieces(asr), tok, emb)
    if folder == "tiny_distilbert":  # lowercased WordPiece: upper-case-only pieces are still mappable
        assert 0 < int(pmap.mappable.sum()) < asr.vocab_size
    log_probs, lengths, _ = softtext_inputs(1, asr.vocab_size)  # [3, 12, V+1]
    noisy = log_probs.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = torch.randn(12 - n, noisy.shape[2]).log_softmax(-1)
    with torch.no_grad():
        soft = bridge(noisy, lengths, pmap)
        mask = draw_mask(soft.lengths, soft.tokens.shape[1], 0.4, torch.Generator().manual_seed(0))
        batched, _ = mlm_soft_label_loss(mlm, tok, pmap, soft, mask)
        assert torch.isfinite(batched) and batched > 0
        total, count = 0.0, 0
        for b, n in enumerate(lengths.tolist()):
            alone = bridge(log_probs[b : b + 1, :n], lengths[b : b + 1], pmap)
            k = int(alone.lengths[0])
            loss, _ = mlm_soft_label_loss(mlm, tok, pmap, alone, mask[b : b + 1, :k])
            total, count = total + loss * int(mask[b, :k].sum()), count + int(mask[b, :k].sum())
        torch.testing.assert_close(batched, total / count, atol=1e-5, rtol=1e-5)


def test_draw_mask_masks_every_nonempty_hypothesis():
    lengths = torch.tensor([5, 0, 1, 30])
    mask = draw_mask(lengths, 30, 0.15, torch.Generator().manual_seed(0))
    assert mask.sum(1)[[0, 2, 3]].min() >= 1 and mask[1].sum() == 0
    assert not mask[0, 5:].any() and mask[2].tolist()[:1] == [True]


def _long_log_probs(num_pieces: int, frames: int = 120):
    """CTC log-probs [1, T, V+1] whose greedy path is a piece on every other frame and blank between: about T/2
    tokens, more than the tiny MLMs' 38 positions."""
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(1, frames, num_pieces + 1)
    logits[0, 1::2, num_pieces] = 8.0  # blank
    logits[0, torch.arange(0, frames, 2), torch.randint(1, num_pieces, (frames // 2,), generator=g)] = 8.0
    return logits.log_softmax(-1), torch.tensor([frames])


def test_masked_positions_only_past_the_truncation_give_zero_not_nan(tokenizer_dir, tiny_bert):
    """A hypothesis longer than the MLM's positions is truncated; a mask left with nothing inside the kept window
    gave the mean over zero positions (NaN). The loss is now 0, attached to the graph with a zero gradient."""
    model = make(tokenizer_dir, tiny_bert)
    mlm, tok = load_mlm(tiny_bert)
    emb = mlm.get_input_embeddings()
    pmap = PieceMap.build(*asr_pieces(model.tokenizer), tok, emb)
    log_probs, lengths = _long_log_probs(model.tokenizer.vocab_size)
    log_probs.requires_grad_(True)
    soft = bridge(log_probs, lengths, pmap)
    assert soft.tokens.shape[1] > mlm.config.max_position_embeddings - 2
    mask = torch.zeros_like(soft.tokens, dtype=torch.bool)
    mask[0, mlm.config.max_position_embeddings :] = True  # every masked position is past the truncation
    loss, acc = mlm_soft_label_loss(mlm, tok, pmap, soft, mask)
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()
    assert torch.isfinite(log_probs.grad).all() and log_probs.grad.abs().sum() == 0


def test_objective_masks_where_the_mlm_reads(tokenizer_dir, tiny_bert):
    """The objective draws its mask inside the truncated window, so its one forced position (mask_prob tiny) is
    always read: finite loss, at least one masked position, for every draw."""
    model = make(tokenizer_dir, tiny_bert, mask_prob=0.01)
    term = model.objectives["mlm"]
    ctx = model.step_context(asr_batch(model, LLM_CORPUS[:1]), compute_wer=False)
    log_probs, lengths = _long_log_probs(model.tokenizer.vocab_size)
    ctx = dataclasses.replace(ctx, log_probs=log_probs, encoded_len=lengths)
    for seed in range(20):
        torch.manual_seed(seed)
        loss, stats = term(ctx)
        assert torch.isfinite(loss) and loss > 0 and stats["masked"] >= 1, seed


BAD = [
    ({"mask_prb": 0.1}, f"{KEY}: unknown key(s) ['mask_prb']"),
    ({"model_dir": None}, f"{KEY}.model_dir must be a local Hugging Face AutoModelForMaskedLM folder"),
    ({"model_dir": "/nonexistent/mlm"}, f"{KEY}.model_dir must be a local Hugging Face AutoModelForMaskedLM"),
    ({"mask_prob": 0.0}, f"{KEY}.mask_prob must be a finite number in (0.0, 1.0]"),
    ({"finetune": "yes"}, f"{KEY}.finetune must be true or false"),
    ({"estimator": "argmax"}, f"{KEY}.estimator must be one of ['expected', 'straight_through', 'gumbel']"),
    ({"head_block": 4}, f"{KEY}.head_block must be null (the final CTC head) or one of the interctc blocks []"),
    ({"gumbel_tau": -1}, f"{KEY}.gumbel_tau must be a finite number in (0.0, 100.0]"),
]


@pytest.mark.parametrize("block,message", BAD, ids=[m.split(KEY)[-1][:40] for _, m in BAD])
def test_config_errors_name_the_key(tokenizer_dir, tiny_bert, block, message):
    cfg = tiny_model_cfg(tokenizer_dir, mlm={"model_dir": tiny_bert, **block})
    with pytest.raises(ConfigError) as err:
        EncDecCTCLLMModelBPE(cfg)
    assert message in str(err.value)


def test_train_mlm_script_writes_a_folder_the_objective_accepts(tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("# a comment\n" + "\n".join(SENTENCES[:400]) + "\n")
    out = tmp_path / "mlm"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "train_mlm.py"),
            "--out",
            str(out),
            "--corpus",
            str(corpus),
            "--asr-tokenizer",
            tokenizer_dir,
            "--hidden",
            "16",
            "--layers",
            "1",
            "--steps",
            "3",
            "--batch",
            "8",
            "--warmup",
            "1",
            "--test-fraction",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "mlm_eval.json").read_text())
    distinct = len(set(SENTENCES[:400]))
    assert metrics["test_sentences"] == int(0.1 * distinct) and metrics["steps"] == 3
    assert metrics["train_sentences"] + metrics["test_sentences"] == distinct
    assert metrics["masked_tokens"] > 0 and 0 <= metrics["unigram_accuracy"] <= 1
    assert "held-out masked-token accuracy" in proc.stdout
    model = make(tokenizer_dir, str(out))
    ctx = model.step_context(asr_batch(model, LLM_CORPUS[:2]), compute_wer=False)
    loss, _ = model.objectives["mlm"](ctx)
    assert torch.isfinite(loss)
    # the MLM's vocabulary is the ASR pieces: the piece map is exact (piece v = MLM token v + 4, <unk> excluded)
    pmap = model.objectives["mlm"].reader.pmap
    V = model.tokenizer.vocab_size
    assert pmap.mappable.tolist() == [False] + [True] * (V - 1)
    assert pmap.first_token[1:].tolist() == [v + PIECE_OFFSET for v in range(1, V)]
    mlm, _ = load_mlm(str(out))
    torch.testing.assert_close(pmap.matrix[1:], mlm.get_input_embeddings().weight[PIECE_OFFSET + 1 : PIECE_OFFSET + V])
