"""token_contrastive (SimCLR / BYOL on frame-level encoder representations): gradients, the BYOL target,
overfitting one batch, padding invariance, export and config errors."""

import dataclasses

import pytest
import torch
from conftest import encoder_gradient, overfit, tiny_model_cfg
from gradcheck import assert_gradient_matches_finite_differences
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.core.classes.mixins import AccessMixin
from omegaconf import OmegaConf
from test_model import audio_batch, fake_trainer, make

from nemo_ctcllm.export import atomic_save, export_for_inference, strip_for_inference
from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.objectives.token_contrastive import frame_index, gather_frames, info_nce, near_frames

SIMCLR = {"mode": "simclr", "proj_dim": 16, "frames_per_utt": 8}
BYOL = {"mode": "byol", "proj_dim": 16, "ema_decay": 0.9}
NO_AUG = {"freq_masks": 0, "time_masks": 0}
SHORT = (6400, 4800, 3200)  # audio lengths of the optimisation tests: 10, 8 and 5 encoder frames


def grad_norm(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def plain_param_count(tokenizer_dir):
    cfg = tiny_model_cfg(tokenizer_dir)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("objectives")
    return sum(p.numel() for p in EncDecCTCModelBPE(cfg).parameters())


def test_frame_index_samples_distinct_valid_frames():
    lengths = torch.tensor([10, 3, 7])
    g = torch.Generator().manual_seed(0)
    idx, keep = frame_index(lengths, 12, 5, g)  # [B, 5]
    assert idx.shape == keep.shape == (3, 5)
    assert keep.sum(1).tolist() == [5, 3, 5]
    for b in range(3):
        picked = idx[b][keep[b]]
        assert len(set(picked.tolist())) == len(picked) and int(picked.max()) < int(lengths[b])
    again = frame_index(lengths, 12, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], idx)  # deterministic given the seed
    x = torch.arange(3 * 12, dtype=torch.float32).view(3, 12, 1)  # [B, T, C]
    assert gather_frames(x, idx, keep).shape == (13, 1)
    all_idx, all_keep = frame_index(lengths, 12, None)
    assert all_keep.sum() == 20 and torch.equal(gather_frames(x, all_idx, all_keep)[:10, 0], x[0, :10, 0])


def _info_nce_by_hand(a, b, tau, negatives, exclude):
    """The module docstring's losses, one anchor at a time: -log exp(s_pos) / sum over the kept candidates."""
    N = a.shape[0]
    terms = []
    if negatives == "cross_view":
        for x, y in ((a, b), (b, a)):
            for i in range(N):
                kept = [j for j in range(N) if j == i or not exclude[i, j]]
                s = torch.stack([x[i] @ y[j] for j in kept]) / tau
                terms.append(0.5 * -(s[kept.index(i)] - s.logsumexp(0)))
        return torch.stack(terms).sum() / N
    u = torch.cat([a, b])
    for k in range(2 * N):
        i, pos = k % N, (k + N) % (2 * N)
        kept = [m for m in range(2 * N) if m == pos or (m != k and not exclude[i, m % N])]
        s = torch.stack([u[k] @ u[m] for m in kept]) / tau
        terms.append(-(s[kept.index(pos)] - s.logsumexp(0)))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("negatives", ["cross_view", "nt_xent"])
@pytest.mark.parametrize("window", [0, 2])
def test_info_nce_negatives_and_exclusion_window_match_the_formula(negatives, window):
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    utt = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # sampled frames of three utterances
    pos = torch.tensor([1, 2, 4, 9, 0, 3, 5])  # their frame positions
    exclude = near_frames(utt, pos, window)
    assert exclude.sum() == (7 if window == 0 else 7 + 2 * 2)  # w = 2: (1, 2), (2, 4) both ways
    loss, acc = info_nce(a, b, 0.3, negatives, exclude)
    torch.testing.assert_close(loss, _info_nce_by_hand(a, b, 0.3, negatives, exclude))
    assert 0.0 <= float(acc) <= 1.0
    if window == 0:  # w = 0 excludes nothing: the same loss as no exclusion
        torch.testing.assert_close(loss, info_nce(a, b, 0.3, negatives)[0])


def test_nt_xent_uses_same_view_negatives():
    """A change of one same-view similarity (a_0 . a_3, every a_i . b_j kept) moves NT-Xent (2N - 2 negatives)
    and leaves cross-view InfoNCE (other view only) as it was."""
    g = torch.Generator().manual_seed(1)
    a = torch.cat([torch.randn(4, 3, generator=g), torch.zeros(4, 1)], 1)  # [4, 4]; b has no 4th component
    b = torch.cat([torch.randn(4, 3, generator=g), torch.zeros(4, 1)], 1)
    a2 = a.clone()
    a2[[0, 3], 3] = 1.0  # a_0 . a_3 grows by 1; a_i . b_j and a_0 . a_1, a_0 . a_2 ... unchanged
    for negatives, moves in (("cross_view", False), ("nt_xent", True)):
        before, after = info_nce(a, b, 0.5, negatives)[0], info_nce(a2, b, 0.5, negatives)[0]
        assert torch.allclose(before, after) is not moves, negatives


@pytest.mark.parametrize(
    "block",
    [SIMCLR, {**SIMCLR, "negatives": "nt_xent", "exclude_window": 2}, BYOL],
    ids=["cross_view", "nt_xent_window2", "byol"],
)
def test_gradients_reach_encoder_and_head(tokenizer_dir, block):
    """This term's loss alone is backpropagated (a total with ctc_final would feed the encoder anyway)."""
    model = fake_trainer(make(tokenizer_dir, token_contrastive=block))
    model.train()
    term = model.objectives["token_contrastive"]
    loss, stats = term(model.step_context(audio_batch(lengths=SHORT), compute_wer=False))
    assert torch.isfinite(loss)
    if block["mode"] == "simclr":
        assert 0.0 <= float(stats["acc"]) <= 1.0 and float(stats["frames"]) == 8 + 8 + 5
    loss.backward()
    assert encoder_gradient(model) > 0
    for name, p in term.named_parameters():
        if p.requires_grad:  # BYOL's EMA target is not trained
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_byol_target_gets_no_gradient_and_stays_out_of_the_optimizer(tokenizer_dir):
    """With self-conditioned InterCTC in the same model: the target copy runs no hook, registers nothing into
    the capture registry, and a full training step (both terms) still works twice in a row."""
    model = fake_trainer(
        make(
            tokenizer_dir, token_contrastive=BYOL, interctc={"blocks": [2], "weights": [0.3], "self_conditioning": True}
        )
    )
    model.train()
    term = model.objectives["token_contrastive"]
    target = list(term.target_encoder.parameters()) + list(term.target_projector.parameters())
    assert target and not any(p.requires_grad for p in target)
    assert all(not m._forward_hooks for m in term.target_encoder.modules())
    assert model.encoder.layers[1]._forward_hooks  # the online encoder keeps its self-conditioning hook
    for _ in range(2):
        out = model.training_step(audio_batch(lengths=SHORT), 0)
        assert {"train/token_contrastive", "train/interctc_l2", "train/token_contrastive_cos"} <= set(model.logged)
        out["loss"].backward()
    assert all(p.grad is None for p in target)
    assert grad_norm(term.predictor.parameters()) > 0 and grad_norm(term.projector.parameters()) > 0
    assert encoder_gradient(model) > 0
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": 1e-3}))
    in_opt = {id(p) for g in model._optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in target)
    assert all(id(p) in in_opt for p in model.parameters() if p.requires_grad)

    # Even inside an open capture window, the extra encoder passes register nothing and leave access as found.
    ctx = model.step_context(audio_batch(lengths=SHORT), compute_wer=False)
    AccessMixin.set_access_enabled(access_enabled=True, guid=model.model_guid)
    try:
        term(ctx)
        assert AccessMixin.is_access_enabled(model.model_guid)
        assert AccessMixin.get_module_registry(model) == {}
        assert all(t.pop_stash() == {} for n, t in model.objectives.items() if n.startswith("interctc"))
    finally:
        AccessMixin.reset_registry(model)


def test_simclr_overfits_one_batch(tokenizer_dir):
    model = make(tokenizer_dir, token_contrastive=SIMCLR)
    model.train()
    term = model.objectives["token_contrastive"]
    batch = audio_batch(lengths=SHORT)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses, _ = overfit(lambda: term(model.step_context(batch, compute_wer=False)), trainable, steps=12, lr=5e-3)
    print("SimCLR losses:", [round(x, 3) for x in losses])
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_byol_ema_target_follows_online_weights(tokenizer_dir):
    """What BYOL guarantees: the target is a hard copy at the first step, then xi <- d xi + (1 - d) theta once
    per optimizer step (so ||xi - theta|| shrinks by exactly d), and the loss stays finite (it need not fall:
    the online network chases a moving target)."""
    model = fake_trainer(make(tokenizer_dir, token_contrastive=BYOL))
    model.train()
    term = model.objectives["token_contrastive"]
    batch = audio_batch(lengths=SHORT)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def distance():
        pairs = zip(term.target_encoder.parameters(), model.encoder.parameters())
        return sum(float((t - o).pow(2).sum()) for t, o in pairs) ** 0.5

    losses = []
    for step in range(8):
        model._trainer.global_step = step
        before = distance()
        loss, _ = term(model.step_context(batch, compute_wer=False))
        after = distance()
        if step == 0:
            assert after == 0.0 and bool(term.target_ready)
        else:
            assert after == pytest.approx(0.9 * before, rel=1e-4)
        if step == 1:  # a second micro-batch of the same optimizer step: no second update
            term(model.step_context(batch, compute_wer=False))
            assert distance() == pytest.approx(after, rel=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(0.0 <= x <= 4.0 for x in losses)
    print("BYOL losses:", [round(x, 3) for x in losses])


def test_projections_are_padding_invariant(tokenizer_dir):
    """Eval mode (no augmentation): an utterance's projected frames (the SimCLR projection z, and BYOL's online
    prediction p, built on the same per-frame projector) alone equal those inside a padded batch."""
    model = make(tokenizer_dir, token_contrastive={"mode": "byol", "proj_dim": 16})
    model.eval()
    term = model.objectives["token_contrastive"]
    sig, sl, tg, tl = audio_batch(lengths=(16000, 12800, 9600))
    with torch.no_grad():
        ctx = model.step_context((sig, sl, tg, tl), compute_wer=False)
        view_b = term.view_b(ctx)[0]  # eval: no augmentation, view B is view A
        z, p = term.project(view_b), term.online_predict(view_b)  # [B, T, P] each
        for i in range(3):
            n = int(sl[i])
            alone = model.step_context((sig[i : i + 1, :n], sl[i : i + 1], tg[i : i + 1], tl[i : i + 1]), False)
            T = int(alone.encoded_len[0])
            assert T == int(ctx.encoded_len[i])
            torch.testing.assert_close(z[i, :T], term.project(alone.encoded)[0, :T], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p[i, :T], term.online_predict(alone.encoded)[0, :T], rtol=1e-4, atol=1e-5)


def test_view_b_is_frame_aligned_with_view_a(tokenizer_dir):
    """Train mode with this block's augmentation off (and no dropout, no dither in the tiny model): the second
    pass reproduces view A frame by frame, so frame t of both views is the same frame."""
    model = make(tokenizer_dir, token_contrastive={**SIMCLR, **NO_AUG})
    model.train()
    term = model.objectives["token_contrastive"]
    with torch.no_grad():
        ctx = model.step_context(audio_batch(lengths=SHORT), compute_wer=False)
        torch.testing.assert_close(term.view_b(ctx)[0], ctx.encoded, rtol=1e-5, atol=1e-5)
        noisy = make(tokenizer_dir, token_contrastive={**SIMCLR, **NO_AUG, "noise_snr_db": 10.0})
        noisy.load_state_dict(model.state_dict())
        noisy.train()
        nterm = noisy.objectives["token_contrastive"]
        assert not torch.allclose(nterm.view_b(noisy.step_context(audio_batch(lengths=SHORT), False))[0], ctx.encoded)


@pytest.mark.parametrize("block", [SIMCLR, BYOL], ids=["simclr", "byol"])
def test_export_drops_the_objective(tokenizer_dir, block):
    model = make(tokenizer_dir, token_contrastive=block)
    assert sum(p.numel() for p in model.parameters()) > plain_param_count(tokenizer_dir)
    assert strip_for_inference(model) is True
    assert not any(k.startswith("objectives.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == plain_param_count(tokenizer_dir)


def test_byol_nemo_round_trip_and_export(tokenizer_dir, tmp_path):
    """The training .nemo keeps the EMA target (to resume); the exported one is a plain CTC model."""
    from nemo.collections.asr.models import ASRModel

    model = fake_trainer(make(tokenizer_dir, token_contrastive=BYOL))
    model.train()
    model.objectives["token_contrastive"](model.step_context(audio_batch(lengths=SHORT), False))  # target_ready
    path = atomic_save(model, str(tmp_path / "train.nemo"))
    restored = ASRModel.restore_from(path, map_location="cpu")
    assert bool(restored.objectives["token_contrastive"].target_ready)
    export_for_inference(path, str(tmp_path / "infer.nemo"))
    exported = ASRModel.restore_from(str(tmp_path / "infer.nemo"), map_location="cpu")
    assert type(exported) is EncDecCTCModelBPE
    assert sum(p.numel() for p in exported.parameters()) == plain_param_count(tokenizer_dir)


@pytest.mark.parametrize(
    "key,value",
    [
        ("mode", "moco"),
        ("proj_dim", 0),
        ("temperature", 0.0),
        ("frames_per_utt", 0),
        ("frames_per_utt", 2.5),
        ("negatives", "same_view"),
        ("exclude_window", -1),
        ("ema_decay", 1.0),
        ("noise_snr_db", "loud"),
        ("freq_masks", -1),
        ("time_masks", True),
        ("freq_width", 41),  # the tiny model has 40 mel features
        ("time_width", 1.5),
        ("time_width", -3),
    ],
)
def test_config_errors_name_the_key(tokenizer_dir, key, value):
    with pytest.raises(ConfigError, match=rf"model\.objectives\.token_contrastive\.{key}"):
        make(tokenizer_dir, token_contrastive={key: value})


def test_unknown_key_is_rejected(tokenizer_dir):
    with pytest.raises(ConfigError, match="token_contrastive: unknown key"):
        make(tokenizer_dir, token_contrastive={"temprature": 0.1})


@pytest.mark.parametrize("mode", ["simclr", "byol"])
def test_no_pass_changes_the_batch(tokenizer_dir, mode):
    """NeMo's preprocessor dithers its input in place in training mode; every pass (the model's and the two
    views') goes through a copy, so the batch's signal is the same after the step (before: each pass added
    noise to it, and the next term read a changed batch)."""
    model = fake_trainer(make(tokenizer_dir, token_contrastive=SIMCLR if mode == "simclr" else BYOL))
    model.preprocessor.featurizer.dither = 1e-3
    model.train()
    batch = audio_batch(lengths=SHORT)
    signal = batch[0].clone()
    model.training_step(batch, 0)["loss"].backward()
    assert torch.equal(batch[0], signal)


class FixedEncoder(torch.nn.Module):
    """Stands in for an encoder in an objective's extra pass: returns ``out`` [B, D, T] whatever the features."""

    def __init__(self, out: torch.Tensor, lengths: torch.Tensor):
        super().__init__()
        self.out, self.lengths = out, lengths

    def forward(self, audio_signal, length):
        return self.out, self.lengths


@pytest.mark.parametrize("block", [SIMCLR, BYOL], ids=["simclr", "byol"])
def test_gradient_matches_finite_differences_per_view(tokenizer_dir, block):
    """d loss / d view A (``ctx.encoded``) and d loss / d view B (the online encoder's output on view B's
    input), each alone, against central differences in float64.

    The extra encoder passes return fixed tensors (:class:`FixedEncoder`): view B's online pass a float64 leaf
    the test perturbs, BYOL's EMA target (no gradient) a float32 constant. The objective's part of each path
    is what is checked; the encoder's own backward is torch's, and full encoder passes take seconds each on
    this shared CPU. The projector and predictor run in float64. Randomness: SimCLR's frames come from a
    generator seeded by ``ctx.step``; the global RNG (view B's own SpecAugment masks, on) is re-seeded before
    every evaluation.

    Catches a ``.detach()`` on either view: on ``ctx.encoded`` or on ``enc_b`` in ``simclr`` / ``byol``, and on
    the output of ``view_b``."""
    model = make(tokenizer_dir, token_contrastive=block)
    model.train()
    term = model.objectives["token_contrastive"]
    with torch.no_grad():
        ctx = model.step_context(audio_batch(lengths=SHORT), compute_wer=False)
    g = torch.Generator().manual_seed(0)
    view_a = ctx.encoded.double().requires_grad_(True)  # [B, D, T]
    noise = 0.3 * torch.randn(view_a.shape, dtype=torch.float64, generator=g)  # [B, D, T]
    view_b = (view_a.detach() + noise).requires_grad_(True)  # [B, D, T]: a related second view
    env = dataclasses.replace(ctx.env, encoder=FixedEncoder(view_b, ctx.encoded_len))
    ctx = dataclasses.replace(ctx, env=env, encoded=view_a)
    term.projector.double()
    if block["mode"] == "byol":
        target = (ctx.encoded.detach() - noise).float()  # [B, D, T]
        term.target_encoder = FixedEncoder(target, ctx.encoded_len)
        term.predictor.double()

    def loss_fn():
        torch.manual_seed(0)
        return term(ctx)[0]

    assert_gradient_matches_finite_differences(
        loss_fn, {"view A": view_a, "view B": view_b}, eps=1e-6, atol=1e-8, rtol=1e-5
    )
