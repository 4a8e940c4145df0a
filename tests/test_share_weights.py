"""weight_mode: share: a term's weight moves, on grad-share logging steps, so that its share of the encoder gradient
norms tracks target_share. The update rule alone (convergence on a toy with known norms, clipping, warm-up), the
config errors, a tiny real model that reaches its target on the demo speech, a resume that continues with exactly
the saved weights, and two ranks that agree (2 processes over gloo). Training runs are in
tests/share_weights_worker.py."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_model_cfg
from share_weights_worker import fit, share_cfg

from nemo_ctcllm.models import EncDecCTCLLMModelBPE
from nemo_ctcllm.objectives import ConfigError
from nemo_ctcllm.objectives.base import ShareTarget, update_share_weight

TIMEOUT = 900  # a hang guard for a loaded 2-core machine, not a timed assertion


def target(s, low=0.001, high=10.0, beta=0.3):
    return ShareTarget("model.objectives.x", s, low, high, beta)


def toy(norms, weights, targets, updates, ramps=None):
    """Terms with fixed unweighted encoder-gradient norms ``norms`` {name: n}: each update measures |g_i| = w_i·r_i·n_i
    (r_i: ``ramps`` {name: warm-up factor}, default 1) and moves every share-mode term (``targets`` {name:
    ShareTarget}) from the same measurements, as the model does. Returns (weights, shares at full ramp) after
    ``updates`` updates."""
    weights, ramps = dict(weights), ramps or {}
    for _ in range(updates):
        measured = {n: weights[n] * ramps.get(n, 1.0) * norms[n] for n in norms}
        weights.update(
            {
                n: update_share_weight(
                    weights[n], ramps.get(n, 1.0), measured[n], sum(v for m, v in measured.items() if m != n), share
                )
                for n, share in targets.items()
            }
        )
    full = {n: weights[n] * norms[n] for n in norms}
    return weights, {n: v / sum(full.values()) for n, v in full.items()}


def test_update_converges_to_the_targets_of_several_terms():
    norms = {"ctc_final": 2.0, "a": 5.0, "b": 0.1}
    start = {"ctc_final": 1.0, "a": 1.0, "b": 1.0}
    targets = {"a": target(0.3), "b": target(0.2)}
    _, before = toy(norms, start, targets, 0)
    assert abs(before["a"] - 0.3) > 0.3 and abs(before["b"] - 0.2) > 0.15  # far from the targets at the start
    weights, shares = toy(norms, start, targets, 100)
    assert shares["a"] == pytest.approx(0.3, abs=1e-6) and shares["b"] == pytest.approx(0.2, abs=1e-6)
    assert weights["ctc_final"] == 1.0  # the reference never moves


def test_one_update_is_the_closed_form_smoothed_in_log_space():
    # ctc_final norm 3, the term's unweighted norm 1 at w = 1: share 0.25; for s* = 0.5 the weight must be 3
    assert update_share_weight(1.0, 1.0, 1.0, 3.0, target(0.5, beta=1.0)) == pytest.approx(3.0)
    assert update_share_weight(1.0, 1.0, 1.0, 3.0, target(0.5, beta=0.5)) == pytest.approx(3.0**0.5)  # geometric
    # odds form: w* = w · odds(s*) / odds(s), here w = 2 measured at share 0.8 (norm 4 vs 1), s* = 0.5
    assert update_share_weight(2.0, 1.0, 4.0, 1.0, target(0.5, beta=1.0)) == pytest.approx(2.0 * 1.0 / 4.0)


def test_warm_up_scales_the_moving_weight_and_the_update_aims_at_full_ramp():
    norms, start, targets = {"ctc_final": 3.0, "a": 1.0}, {"ctc_final": 1.0, "a": 1.0}, {"a": target(0.5, beta=1.0)}
    weights, shares = toy(norms, start, targets, 1, ramps={"a": 0.25})  # measured at a quarter of its weight
    assert weights["a"] == pytest.approx(3.0) and shares["a"] == pytest.approx(0.5)  # not 12: no overshoot later


def test_clipping_and_no_update_without_a_measurement():
    # the share needs weight 1e4 (or 1e-4): clipped to max_weight (min_weight) and held there
    big, _ = toy({"ctc_final": 1.0, "a": 1e-4}, {"ctc_final": 1.0, "a": 1.0}, {"a": target(0.5, 0.1, 5.0)}, 30)
    small, _ = toy({"ctc_final": 1e-4, "a": 1.0}, {"ctc_final": 1.0, "a": 1.0}, {"a": target(0.5, 0.1, 5.0)}, 30)
    assert big["a"] == 5.0 and small["a"] == 0.1
    for norm, others in ((0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf"))):
        assert update_share_weight(0.7, 1.0, norm, others, target(0.5)) == 0.7


HEAD = {"blocks": [2], "weights": [1.0], "weight": 0.3}  # interctc_l2 at weight 0.3
SHARE = {**HEAD, "weight_mode": "share", "target_share": 0.2}
TWO_HEADS = {**SHARE, "blocks": [1, 2], "weights": [1.0, 1.0], "target_share": 0.5}


@pytest.mark.parametrize(
    "block, grad_shares, match",
    [
        ({**SHARE, "target_share": 0.0}, 5, r"interctc\.target_share must be .* \(0"),
        ({**SHARE, "target_share": 1.0}, 5, r"interctc\.target_share must be"),
        ({**SHARE, "target_share": None}, 5, r"interctc\.target_share must be set"),
        ({**HEAD, "target_share": 0.2}, 5, r"interctc\.target_share is set but .*fixed"),
        ({**SHARE, "weight_mode": "auto"}, 5, r"interctc\.weight_mode must be one of"),
        ({**SHARE, "min_weight": 2.0, "max_weight": 1.0}, 5, r"interctc\.min_weight \(2.0\) must be <="),
        ({**SHARE, "min_weight": 0.0}, 5, r"interctc\.min_weight must be"),
        ({**SHARE, "max_weight": 200.0}, 5, r"interctc\.max_weight must be"),
        ({**SHARE, "share_smoothing": 0.0}, 5, r"interctc\.share_smoothing must be"),
        ({**SHARE, "min_weight": 0.5}, 5, r"interctc\.weight: term interctc_l2 starts at weight 0.3, outside"),
        (SHARE, 0, r"interctc\.weight_mode is share.*model\.grad_shares\.every_n_steps is 0"),
        (TWO_HEADS, 5, r"interctc\.target_share: .*sum to 1, but must sum to less than 1"),
    ],
)
def test_config_errors_name_the_key(tokenizer_dir, block, grad_shares, match):
    cfg = tiny_model_cfg(tokenizer_dir, interctc=block)
    cfg.grad_shares = {"every_n_steps": grad_shares}
    with pytest.raises(ConfigError, match=r"model\.objectives\." + match):
        EncDecCTCLLMModelBPE(cfg)


def test_share_mode_on_ctc_final_is_refused(tokenizer_dir):
    cfg = tiny_model_cfg(tokenizer_dir, interctc=HEAD)
    cfg.objectives.ctc_final = {"weight_mode": "share", "target_share": 0.5}
    cfg.grad_shares = {"every_n_steps": 5}
    with pytest.raises(ConfigError, match=r"model\.objectives\.ctc_final\.weight_mode: share is not allowed"):
        EncDecCTCLLMModelBPE(cfg)


def test_fixed_mode_is_unchanged_and_share_mode_logs_its_weight(tokenizer_dir):
    from test_model import audio_batch, fake_trainer, train_step

    for mode in ("fixed", "share"):
        cfg = tiny_model_cfg(tokenizer_dir, interctc={**HEAD, "weight_mode": mode})
        if mode == "share":
            cfg.objectives.interctc.target_share = 0.6
        cfg.grad_shares = {"every_n_steps": 1}
        torch.manual_seed(0)
        model = fake_trainer(EncDecCTCLLMModelBPE(cfg))
        model.train()
        _, logs = train_step(model, audio_batch())
        assert ("train/weight/interctc_l2" in logs) == (mode == "share")
        moved = model.objectives["interctc_l2"].weight
        assert (moved == 0.3) == (mode == "fixed"), (mode, moved)
        if mode == "share":  # the update read this step's logged norms: the term's own against the others'
            norm = {n: float(logs[f"train/grad_norm/{n}"]) for n in ("ctc_final", "interctc_l2")}
            share = model.objectives["interctc_l2"].share
            expected = update_share_weight(0.3, 1.0, norm["interctc_l2"], norm["ctc_final"], share)
            assert moved == pytest.approx(expected, rel=1e-6)


def test_tiny_model_reaches_its_target_share_and_a_resume_continues_exactly(demo_corpus, tokenizer_dir, tmp_path):
    """24 steps on the demo speech (4 epochs of 6 batches, in order), a checkpoint at step 20; then a second run
    resumed from it. The head after block 1 starts well below its target share 0.6 (at weight 0.3) and ends within
    0.1 of it; the resumed run starts from the saved weight (not the YAML one) and repeats the uninterrupted run's
    weights and shares exactly."""
    cfg = share_cfg(tokenizer_dir, demo_corpus["train"], target=0.6)
    records, _ = fit(cfg, steps=24, ckpt_dir=tmp_path / "ckpt", save_every=20)
    assert [r["step"] for r in records] == list(range(24))
    assert records[0]["logged_weight"] == pytest.approx(0.3)
    assert records[0]["share"] < 0.45, records[0]  # far from the target at the YAML weight
    late = [r["share"] for r in records[-12:]]
    assert abs(sum(late) / len(late) - 0.6) < 0.1, late
    assert all(0.01 <= r["weight"] <= 20.0 for r in records)

    resumed, _ = fit(cfg, steps=24, resume=str(tmp_path / "ckpt" / "step=20.ckpt"))
    assert [r["step"] for r in resumed] == list(range(20, 24))
    saved = records[19]["weight"]  # the weight after step 19's update, in the checkpoint
    assert saved != pytest.approx(0.3, abs=0.05)  # it moved: restoring the YAML weight would fail below
    assert resumed[0]["logged_weight"] == pytest.approx(saved, rel=1e-6)  # the weight step 20 used (logged fp32)
    for first, again in zip(records[20:], resumed):
        assert again["batch"] == first["batch"], (first, again)  # the same batches (mid-epoch resume)
        assert again["weight"] == first["weight"], (first, again)  # bit for bit
        assert again["share"] == first["share"], (first, again)


def test_two_ranks_agree_on_the_weights(demo_corpus, tokenizer_dir, tmp_path):
    """2 processes (Lightning ddp over gloo) see different batches, so their own gradient shares differ; the weights
    follow the norms averaged over the ranks and are equal on both after every step."""
    (tmp_path / "setup.json").write_text(json.dumps({"train": demo_corpus["train"], "tokenizer": tokenizer_dir}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "tests" / "share_weights_worker.py")]
    cmd += ["--mode", "dp", "--out", str(tmp_path), "-"]
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: torchrun's children inherit it
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # torchrun and both workers
            proc.wait()
            pytest.fail(f"torchrun hung past {TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
    assert proc.returncode == 0, log_path.read_text()[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    first, second = ranks[0]["records"], ranks[1]["records"]
    assert [r["step"] for r in first] == [r["step"] for r in second] == list(range(6))
    assert any(a["share"] != b["share"] for a, b in zip(first, second))  # each rank measured its own batch
    assert [r["weight"] for r in first] == [r["weight"] for r in second]
    assert first[-1]["weight"] != pytest.approx(0.3, abs=0.01)  # and it moved
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
