"""joint_lm (a jointly trained attention-decoder LM head): teacher forcing layout, gradients, overfitting one
batch, padding invariance, export and config errors."""

import dataclasses

import pytest
import torch
from conftest import encoder_gradient, overfit
from gradcheck import assert_gradient_matches_finite_differences
from test_model import audio_batch, make
from test_obj_token_contrastive import plain_param_count

from nemo_ctcllm.export import strip_for_inference
from nemo_ctcllm.objectives import ConfigError, StepContext

BLOCK = {"layers": 1, "heads": 2}


def test_teacher_forcing_layout(tokenizer_dir):
    term = make(tokenizer_dir, joint_lm=BLOCK).objectives["joint_lm"]
    V = term.vocab_size
    assert (term.bos_id, term.eos_id) == (V, V + 1) and term.out.out_features == V + 2
    targets = torch.tensor([[5, 6, 7], [8, 9, 99]])  # second row: 2 tokens, then padding
    inputs, labels, mask = term.teacher_forcing(targets, torch.tensor([3, 2]))
    assert inputs.tolist() == [[V, 5, 6, 7], [V, 8, 9, 0]]
    assert labels[0].tolist() == [5, 6, 7, V + 1] and labels[1, :3].tolist() == [8, 9, V + 1]
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]


def test_gradients_reach_encoder_and_head(tokenizer_dir):
    model = make(tokenizer_dir, joint_lm=BLOCK)
    model.train()
    term = model.objectives["joint_lm"]
    loss, stats = term(model.step_context(audio_batch(), compute_wer=False))
    assert torch.isfinite(loss) and 0.0 <= float(stats["acc"]) <= 1.0
    loss.backward()
    assert encoder_gradient(model) > 0
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_matches_finite_differences(tokenizer_dir):
    """d loss / d encoder output [B, D, T] (the decoder's memory, its one input from the encoder) against central
    differences, in float64, two decoder layers with dropout 0.1 in training mode: the global RNG is re-seeded
    before every evaluation, so every evaluation draws the same dropout masks. Whatever the weights' init.

    Catches a ``.detach()`` on the memory (``encoded`` in ``token_nll``)."""
    model = make(tokenizer_dir, joint_lm={**BLOCK, "layers": 2, "dropout": 0.1})
    model.train()
    term = model.objectives["joint_lm"].double()
    with torch.no_grad():
        ctx = model.step_context(audio_batch(lengths=(6400, 4800, 3200)), compute_wer=False)  # 10, 8, 5 frames
    encoded = ctx.encoded.double().requires_grad_(True)  # [B, D, T]
    ctx = dataclasses.replace(ctx, encoded=encoded)

    def loss_fn():
        torch.manual_seed(0)  # the same dropout masks
        return term(ctx)[0]

    assert_gradient_matches_finite_differences(loss_fn, {"encoded": encoded}, eps=1e-6, atol=1e-8, rtol=1e-5)


def test_overfits_one_batch(tokenizer_dir):
    model = make(tokenizer_dir, joint_lm=BLOCK)
    model.train()
    term = model.objectives["joint_lm"]
    batch = audio_batch(lengths=(6400, 4800, 3200))  # 10, 8 and 5 encoder frames
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses, _ = overfit(lambda: term(model.step_context(batch, compute_wer=False)), trainable, steps=12, lr=5e-3)
    print("joint_lm losses:", [round(x, 3) for x in losses])
    assert losses[-1] < 0.6 * losses[0], losses


def test_utterance_loss_is_padding_invariant(tokenizer_dir):
    """One utterance alone vs inside a padded batch: (a) end to end, eval mode; (b) the head alone, with
    garbage in the padded encoder frames and target slots (so masking, not zeros, makes it equal)."""
    model = make(tokenizer_dir, joint_lm=BLOCK)
    model.eval()
    term = model.objectives["joint_lm"]
    sig, sl, tg, tl = audio_batch(lengths=(16000, 12800, 9600))
    with torch.no_grad():
        batch_losses = term.utterance_losses(model.step_context((sig, sl, tg, tl), compute_wer=False))  # [B]
        for i in range(3):
            n, u = int(sl[i]), int(tl[i])
            alone = model.step_context((sig[i : i + 1, :n], sl[i : i + 1], tg[i : i + 1, :u], tl[i : i + 1]), False)
            torch.testing.assert_close(term.utterance_losses(alone)[0], batch_losses[i], rtol=1e-4, atol=1e-5)

        T2 = int(alone.encoded_len[0])  # utterance 2 alone (its encoded tensor may hold a padding frame)
        enc = alone.encoded[:, :, :T2]  # [1, D, T2]
        D = enc.shape[1]
        padded_enc = torch.randn(3, D, T2 + 7) * 5.0  # [B, D, T], garbage everywhere
        padded_enc[1, :, :T2] = enc[0]
        padded_tg = torch.randint(0, term.vocab_size, (3, u + 4))
        padded_tg[1, :u] = tg[2, :u]
        lens = torch.tensor([T2 + 7, T2, 3])
        tlens = torch.tensor([u + 4, u, 1])

        def head_losses(encoded, encoded_len, targets, target_len):
            ctx = StepContext(
                env=model.objective_env(),
                signal=sig,
                signal_len=sl,
                encoded=encoded,
                encoded_len=encoded_len,
                log_probs=None,
                targets=targets,
                target_len=target_len,
            )
            return term.utterance_losses(ctx)

        ref = head_losses(enc, alone.encoded_len, tg[2:3, :u], tl[2:3])[0]
        torch.testing.assert_close(term.utterance_losses(alone)[0], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head_losses(padded_enc, lens, padded_tg, tlens)[1], ref, rtol=1e-5, atol=1e-6)


def test_export_drops_the_head(tokenizer_dir):
    model = make(tokenizer_dir, joint_lm=BLOCK)
    assert strip_for_inference(model) is True
    assert not any(k.startswith("objectives.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == plain_param_count(tokenizer_dir)


@pytest.mark.parametrize(
    "key,value",
    [("layers", 0), ("heads", 3), ("heads", 0), ("ffn_mult", 1.5), ("dropout", 1.0), ("dropout", "high")],
)
def test_config_errors_name_the_key(tokenizer_dir, key, value):
    with pytest.raises(ConfigError, match=rf"model\.objectives\.joint_lm\.{key}"):
        make(tokenizer_dir, joint_lm={key: value})


def test_heads_error_lists_allowed_values(tokenizer_dir):
    with pytest.raises(ConfigError, match=r"divide the encoder output width 32; allowed: \[1, 2, 4, 8, 16, 32\]"):
        make(tokenizer_dir, joint_lm={"heads": 3})
