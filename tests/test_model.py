"""EncDecCTCLLMModelBPE against NeMo's EncDecCTCModelBPE, intermediate heads, .nemo round trips, export."""

import os
import types

import pytest
import torch
from conftest import encoder_gradient, tiny_model_cfg
from nemo.collections.asr.models import ASRModel, EncDecCTCModelBPE
from omegaconf import OmegaConf

from nemo_ctcllm.export import atomic_save, export_for_inference
from nemo_ctcllm.models import EncDecCTCLLMModelBPE

MODES = {
    "separate": {"blocks": [1, 3], "weights": [0.2, 0.1]},
    "shared": {"blocks": [2], "weights": [0.3], "shared_decoder": True},
    "selfcond": {"blocks": [1, 3], "weights": [0.2, 0.1], "self_conditioning": True},
}


def fake_trainer(model, step=0):
    """Attach the trainer attributes training_step reads, an optimizer for the logged lr, and record what
    NeMo's training-step wrapper passes to ``log_dict`` in ``model.logged``."""
    model._trainer = types.SimpleNamespace(global_step=step, log_every_n_steps=1)
    model._optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.logged = {}
    model.log_dict = lambda d, **kw: model.logged.update(d)
    return model


def train_step(model, batch):
    """training_step -> (loss, logged dict)."""
    out = model.training_step(batch, 0)
    return out["loss"], model.logged


def audio_batch(seed=0, lengths=(16000, 12800, 9600)):
    """Real-shaped batch: noise-like audio is enough for loss/gradient identity checks."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    signal = torch.randn(B, max(lengths), generator=g) * 0.1  # [B, S]
    for i, n in enumerate(lengths):
        signal[i, n:] = 0.0
    targets = torch.randint(1, 60, (B, 6), generator=g)  # [B, U]
    target_len = torch.tensor([6, 5, 3])
    return signal, torch.tensor(lengths), targets, target_len


def make(tokenizer_dir, **objectives):
    torch.manual_seed(0)
    return EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir, **objectives))


def test_parity_with_encdecctcmodelbpe(tokenizer_dir):
    """Objectives off (ctc_final weight 1): the same loss and the same gradients as NeMo's own class."""
    ours = fake_trainer(make(tokenizer_dir))
    cfg = tiny_model_cfg(tokenizer_dir)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("objectives")
    theirs = fake_trainer(EncDecCTCModelBPE(cfg))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    batch = audio_batch()
    ours.train(), theirs.train()
    loss_ours, log_ours = train_step(ours, batch)
    loss_theirs, log_theirs = train_step(theirs, batch)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=0, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    theirs_grads = dict(theirs.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
        n += 1
    assert n > 10
    assert log_ours["train/ctc_final"] == pytest.approx(float(loss_ours))
    assert log_ours["training_batch_wer"] == pytest.approx(float(log_theirs["training_batch_wer"]))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_interctc_terms_and_gradients(tokenizer_dir, mode):
    block = MODES[mode]
    model = fake_trainer(make(tokenizer_dir, interctc=block))
    model.train()
    loss, logs = train_step(model, audio_batch())
    expected = {"train/ctc_final"} | {f"train/interctc_l{k}" for k in block["blocks"]}
    assert expected <= set(logs)
    for k in block["blocks"]:
        assert f"train/interctc_l{k}_wer" in logs
    # total = 1.0 * final + sum_k w_k * head_k, composed from the logged (unweighted) terms
    total = logs["train/ctc_final"] + sum(
        w * logs[f"train/interctc_l{k}"] for k, w in zip(block["blocks"], block["weights"])
    )
    torch.testing.assert_close(loss.detach(), total, rtol=1e-5, atol=1e-5)
    loss.backward()
    for name, term in model.objectives.items():
        for pname, p in term.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    if block.get("shared_decoder"):
        assert all(t.decoder is None for n, t in model.objectives.items() if n.startswith("interctc"))
    # the heads reach back into the encoder: blocks before the first head get gradient from it
    assert encoder_gradient(model) > 0


def test_interctc_head_moves_only_its_blocks(tokenizer_dir):
    """Optimising a block-1 head alone changes blocks <= 1 and that head, nothing above."""
    model = fake_trainer(make(tokenizer_dir, interctc={"blocks": [1], "weights": [1.0]}, ctc_final={"weight": 0.0}))
    model.train()
    train_step(model, audio_batch())[0].backward()
    assert encoder_gradient(model) > 0
    assert model.encoder.layers[2].feed_forward1.linear1.weight.grad is None or (
        model.encoder.layers[2].feed_forward1.linear1.weight.grad.abs().sum() == 0
    )


def test_selfcond_changes_the_forward_pass(tokenizer_dir):
    plain = make(tokenizer_dir)
    cond = make(tokenizer_dir, interctc=MODES["selfcond"])
    cond.load_state_dict({**cond.state_dict(), **plain.state_dict()})
    plain.eval(), cond.eval()
    sig, sl, _, _ = audio_batch()
    with torch.no_grad():
        a, _, _ = plain.forward(input_signal=sig, input_signal_length=sl)
        b, _, _ = cond.forward(input_signal=sig, input_signal_length=sl)
    assert not torch.allclose(a, b)


def test_warmup_ramps_the_weight(tokenizer_dir):
    model = fake_trainer(make(tokenizer_dir, interctc={"blocks": [2], "weights": [0.5], "warmup_steps": 10}))
    model._trainer.global_step = 4
    model.train()
    logs = train_step(model, audio_batch())[1]
    assert float(logs["train/weight/interctc_l2"]) == pytest.approx(0.5 * 5 / 10)


def test_every_n_steps_runs_a_term_on_its_steps_only(tokenizer_dir):
    """A term with every_n_steps: k adds to the loss (and gets gradient) on training steps divisible by k only,
    still keeps its parameters in the graph on the others, and always runs in validation."""
    model = fake_trainer(make(tokenizer_dir, interctc={"blocks": [2], "weights": [0.5], "every_n_steps": 3}))
    model.train()
    head = model.objectives["interctc_l2"]
    for step, runs in [(0, True), (1, False), (2, False), (3, True)]:
        model._trainer.global_step, model.logged = step, {}
        model.zero_grad()
        loss, logs = train_step(model, audio_batch())
        loss.backward()
        grad = sum(p.grad.abs().sum() for p in head.parameters())
        assert ("train/interctc_l2" in logs) == runs and (float(grad) > 0) == runs, step
        assert all(p.grad is not None for p in head.parameters())  # in the graph (DDP) even when skipped
    model.eval()
    with torch.no_grad():
        assert "val/interctc_l2" in model.validation_pass(audio_batch(), 0)  # global_step 3 % 3 == 0 ...
        model._trainer.global_step = 1
        assert "val/interctc_l2" in model.validation_pass(audio_batch(), 0)  # ... and 1: validation always runs


@pytest.mark.parametrize("mode", ["separate", "selfcond"])
def test_nemo_round_trip_and_export(tokenizer_dir, tmp_path, mode):
    model = make(tokenizer_dir, interctc=MODES[mode])
    model.eval()
    sig, sl, _, _ = audio_batch()
    with torch.no_grad():
        ref, ref_len, _ = model.forward(input_signal=sig, input_signal_length=sl)
    path = atomic_save(model, str(tmp_path / "train.nemo"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # a plain write's permissions, not mkstemp's 0600
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    restored = ASRModel.restore_from(path, map_location="cpu")
    assert type(restored) is EncDecCTCLLMModelBPE
    restored.eval()
    with torch.no_grad():
        out, out_len, _ = restored.forward(input_signal=sig, input_signal_length=sl)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out_len, ref_len)

    cls = export_for_inference(path, str(tmp_path / "infer.nemo"))
    exported = ASRModel.restore_from(str(tmp_path / "infer.nemo"), map_location="cpu")
    exported.eval()
    with torch.no_grad():
        out, _, _ = exported.forward(input_signal=sig, input_signal_length=sl)
    torch.testing.assert_close(out, ref)
    n_params = sum(p.numel() for p in exported.parameters())
    plain_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("objectives."))
    if mode == "separate":
        assert cls.endswith("EncDecCTCModelBPE") and type(exported) is EncDecCTCModelBPE
        assert n_params == plain_params
    else:  # the self-conditioning heads are part of inference and stay
        assert type(exported) is EncDecCTCLLMModelBPE and n_params > plain_params


def test_transcribe_real_audio(tokenizer_dir, demo_corpus):
    from nemo_ctcllm.evaluate import evaluate

    model = make(tokenizer_dir, interctc=MODES["selfcond"])
    result = evaluate(model, demo_corpus["dev"], batch_size=4)
    assert result["utterances"] == 8 and 0.0 <= result["cer"]  # untrained: any WER, but it must run


def test_init_encoder_from_plain_nemo(tokenizer_dir, tmp_path):
    cfg = tiny_model_cfg(tokenizer_dir)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("objectives")
    torch.manual_seed(1)
    plain = EncDecCTCModelBPE(cfg)
    plain.save_to(str(tmp_path / "plain.nemo"))
    model = make(tokenizer_dir, interctc=MODES["separate"])
    assert not torch.equal(
        model.encoder.layers[0].feed_forward1.linear1.weight, plain.encoder.layers[0].feed_forward1.linear1.weight
    )
    model.maybe_init_from_pretrained_checkpoint(
        OmegaConf.create({"init_from_nemo_model": str(tmp_path / "plain.nemo")})
    )
    for name, p in plain.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], p, msg=name)


def test_optimizer_gets_only_trainable_parameters(tokenizer_dir):
    model = make(tokenizer_dir, interctc=MODES["separate"])
    frozen = model.encoder.layers[0]
    frozen.requires_grad_(False)
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": 1e-3}))
    in_opt = {id(p) for g in model._optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in frozen.parameters())
    assert all(id(p) in in_opt for p in model.parameters() if p.requires_grad)
